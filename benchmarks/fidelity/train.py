"""Train SegViT from scratch on the procedural shapes data: ``python -m benchmarks.fidelity.train``.

Eager mode, CPU, everything seeded: the model init from ``torch.manual_seed(SEED)``, training
batch ``i`` is ``make_batch(TRAIN_SEED_BASE + i, batch)``, the held-out set has its own seed.
AdamW with linear warmup then cosine decay, cross-entropy. Writes ``segvit.pt`` (the float32
state_dict) and ``train_log.json`` next to this file.

The defaults are the committed run; ``--steps`` / ``--batch`` / ``--out-dir`` are for trial runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

from .data import make_batch
from .metrics import HELDOUT_SEED, HELDOUT_SIZE, heldout, iou_per_class, confusion
from .model import SegViT, predict

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 0
TRAIN_SEED_BASE = 0
# Progressive resolution: a cheap phase on 64x64 renderings of the same scenes (16x16 tokens, the
# pos-embed interpolated), then the 128x128 phase (32x32 = 1024 tokens) the model is used at.
LOWRES = 64
LOWRES_STEPS = 1500
LOWRES_BATCH = 16
STEPS = 600
BATCH = 8
LR = 2e-3
WEIGHT_DECAY = 0.05
WARMUP = 50
MODEL_CONFIG: dict = {"stem": "conv4bn"}


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * t))


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lowres-steps", type=int, default=LOWRES_STEPS)
    parser.add_argument("--lowres-batch", type=int, default=LOWRES_BATCH)
    parser.add_argument("--steps", type=int, default=STEPS, help="steps at 128x128")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--stem", default=MODEL_CONFIG.get("stem", "conv"), help="SegViT stem (trials)")
    parser.add_argument("--eval-every", type=int, default=0, help="held-out mIoU every N steps (trials)")
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--out-dir", default=HERE, help="where segvit.pt / train_log.json go")
    parser.add_argument("--log-every", type=int, default=25)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    model_config = {**MODEL_CONFIG, "stem": args.stem}
    model = SegViT(**model_config)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n != "pos_embed"]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and n != "pos_embed")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.99),
    )
    total = args.lowres_steps + args.steps
    print(
        f"SegViT {n_params} params; {args.lowres_steps} steps x batch {args.lowres_batch} at {LOWRES}px, "
        f"then {args.steps} steps x batch {args.batch} at 128px; torch {torch.__version__}",
        flush=True,
    )
    if args.eval_every:
        images_h, labels_h = heldout(32)

    model.train()
    t0 = time.perf_counter()
    data_s = 0.0
    ema = None
    losses: list[float] = []
    phase_s = {}
    for step in range(total):
        low = step < args.lowres_steps
        if step == args.lowres_steps:
            phase_s["lowres"] = time.perf_counter() - t0
        td = time.perf_counter()
        if low:
            images, labels = make_batch(TRAIN_SEED_BASE + step, args.lowres_batch, LOWRES)
        else:
            images, labels = make_batch(TRAIN_SEED_BASE + step, args.batch)
        data_s += time.perf_counter() - td
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, args.lr, WARMUP)
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = loss.item()
        losses.append(value)
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        if (step + 1) % args.log_every == 0 or step + 1 == total:
            el = time.perf_counter() - t0
            res = LOWRES if low else 128
            print(f"step {step + 1:5d}/{total} ({res}px)  loss {value:.4f}  ema {ema:.4f}  {el:7.1f}s", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            model.eval()
            ious = iou_per_class(confusion(predict(model, images_h).argmax(1), labels_h))
            model.train()
            print(f"    held-out(32) mIoU {float(ious.nanmean()):.4f} {[round(float(v), 3) for v in ious]}", flush=True)
    train_s = time.perf_counter() - t0
    phase_s["highres"] = train_s - phase_s.get("lowres", 0.0)

    model.eval()
    images, labels = heldout()
    te = time.perf_counter()
    pred = predict(model, images).argmax(1)
    ious = iou_per_class(confusion(pred, labels))
    eval_s = time.perf_counter() - te
    m = float(ious.nanmean())
    print(f"held-out mIoU {m:.4f}  per class {[round(float(v), 4) for v in ious]}  ({eval_s:.1f}s)")

    os.makedirs(args.out_dir, exist_ok=True)
    weights = os.path.join(args.out_dir, "segvit.pt")
    torch.save(model.state_dict(), weights)
    log = {
        "command": "python -m benchmarks.fidelity.train" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(argv if argv is not None else sys.argv[1:])),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": args.threads,
        "segvit_kwargs": model_config,
        "params": n_params,
        "weights_bytes": os.path.getsize(weights),
        "lowres_px": LOWRES,
        "lowres_steps": args.lowres_steps,
        "lowres_batch": args.lowres_batch,
        "steps": args.steps,
        "batch": args.batch,
        "phase_wall_s": {k: round(v, 1) for k, v in phase_s.items()},
        "lr": args.lr,
        "warmup": WARMUP,
        "weight_decay": WEIGHT_DECAY,
        "seed": SEED,
        "train_seeds": f"make_batch({TRAIN_SEED_BASE} + step, batch, size) for step in range({total})",
        "train_wall_s": round(train_s, 1),
        "data_gen_s": round(data_s, 1),
        "final_train_loss": round(losses[-1], 4),
        "final_train_loss_mean_last_25": round(sum(losses[-25:]) / len(losses[-25:]), 4),
        "heldout": {"seed": HELDOUT_SEED, "n": HELDOUT_SIZE},
        "heldout_miou": round(m, 4),
        "heldout_iou_per_class": [round(float(v), 4) for v in ious],
        "loss_curve_every_50": [round(sum(losses[i : i + 50]) / len(losses[i : i + 50]), 4) for i in range(0, len(losses), 50)],
    }
    with open(os.path.join(args.out_dir, "train_log.json"), "w") as f:
        json.dump(log, f, indent=2)
        f.write("\n")
    print(f"wrote {weights} ({log['weights_bytes'] / 1e6:.2f} MB), train wall {train_s:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
