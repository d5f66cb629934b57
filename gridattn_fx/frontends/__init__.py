"""Front ends: how a user reaches the pass (``rewrite()``, the ``gridattn`` torch.compile backend),
and what they need around it (training mode, state dicts of rewritten modules, torch's logs)."""
