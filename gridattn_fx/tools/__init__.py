"""Tools around the pass: calibration, FLOP counting, the report command, the demo."""
