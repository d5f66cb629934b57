"""Per-site stride calibration on the trained SegViT: calibrated strides vs one uniform stride.

    python -m benchmarks.fidelity.calibration

For several error budgets (relative error of the logits on calibration images), runs
``gridattn_fx.calibrate`` and compares the attention FLOPs it saves with the best uniform stride
(1, 2 or 4 everywhere) whose measured error fits the same budget. Both configurations are then
scored on the held-out set (mIoU), which the calibration never saw. Writes
``benchmarks/fidelity/calibration.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import gridattn_fx

from .data import make_batch
from .evaluate import CALIBRATION_SEED, EVAL_BATCH, load_model
from .metrics import heldout, miou
from .model import predict

HERE = os.path.dirname(os.path.abspath(__file__))
BUDGETS = (0.05, 0.1, 0.2, 0.3)


def heldout_miou(model, config, images, labels) -> float:
    """mIoU of the model rewritten with ``config`` (run eagerly), over the held-out set."""
    gm, _ = gridattn_fx.rewrite(model, (images[:EVAL_BATCH],), config)
    return miou(predict(gm, images, EVAL_BATCH).argmax(1), labels)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="*", default=list(BUDGETS))
    parser.add_argument("--samples", type=int, default=8, help="calibration images (in batches of 4)")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = load_model()
    images, _ = make_batch(CALIBRATION_SEED, args.samples)
    samples = [(images[i:i + 4],) for i in range(0, len(images), 4)]
    hx, hy = heldout()
    base_miou = heldout_miou(model, gridattn_fx.GridAttnConfig(stride=1), hx, hy)

    rows = []
    uniform_miou = {}
    for budget in args.budgets:
        t0 = time.perf_counter()
        cal = gridattn_fx.calibrate(model, samples, budget=budget, strides=(1, 2, 4))
        seconds = time.perf_counter() - t0
        fitting = [(saved, s) for s, (err, saved) in cal.uniform.items() if err <= budget]
        uni_saved, uni_stride = max(fitting, default=(0, (1, 1)))
        if uni_stride not in uniform_miou:
            uniform_miou[uni_stride] = heldout_miou(model, gridattn_fx.GridAttnConfig(stride=uni_stride), hx, hy)
        rows.append({
            "budget": budget,
            "site_strides": {p: f"{s[0]}x{s[1]}" for p, s in cal.site_strides.items()},
            "calibrated_error": cal.error,
            "calibrated_saved_pct": 100 * cal.saved_flops / cal.flops_before,
            "calibrated_miou": heldout_miou(model, cal.config, hx, hy),
            "uniform_stride": f"{uni_stride[0]}x{uni_stride[1]}",
            "uniform_error": cal.uniform.get(uni_stride, (0.0, 0))[0],
            "uniform_saved_pct": 100 * uni_saved / cal.flops_before,
            "uniform_miou": uniform_miou[uni_stride],
            "calibrate_seconds": seconds,
        })
        print(cal, flush=True)

    print(f"\nheld-out mIoU of the unmodified model: {base_miou:.4f}")
    head = f"{'budget':>7} {'calibrated strides':<26} {'error':>7} {'saved':>7} {'mIoU':>7} | " \
           f"{'uniform':>7} {'error':>7} {'saved':>7} {'mIoU':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        strides = " ".join(v for v in r["site_strides"].values())
        print(f"{r['budget']:>7.3f} {strides:<26} {r['calibrated_error']:>7.4f} {r['calibrated_saved_pct']:>6.1f}% "
              f"{r['calibrated_miou']:>7.4f} | {r['uniform_stride']:>7} {r['uniform_error']:>7.4f} "
              f"{r['uniform_saved_pct']:>6.1f}% {r['uniform_miou']:>7.4f}")
    with open(os.path.join(HERE, "calibration.json"), "w") as f:
        json.dump({"base_miou": base_miou, "rows": rows, "samples": args.samples,
                   "command": "python -m benchmarks.fidelity.calibration", "torch": torch.__version__}, f, indent=2)
    beats = [r for r in rows if r["calibrated_saved_pct"] > r["uniform_saved_pct"] + 1e-9]
    print(f"calibration: {len(beats)}/{len(rows)} budgets where calibrated strides save more attention FLOPs "
          f"than the best uniform stride within the same budget")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
