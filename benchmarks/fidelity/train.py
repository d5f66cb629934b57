"""Train a fidelity model from scratch on the procedural shapes data: ``python -m benchmarks.fidelity.train``.

``--family segvit`` (the default, the committed ``segvit.pt``), ``--family sam`` (``samlike.pt``) or
``--family segformer`` (``segformerlike.pt``); the recipe per family is in ``families.py``.

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
from .families import FAMILIES
from .metrics import HELDOUT_SEED, heldout, iou_per_class, confusion
from .model import predict

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 0
TRAIN_SEED_BASE = 0
# Progressive resolution: a cheap phase on 64x64 renderings of the same scenes (16x16 tokens, the
# pos-embed interpolated), then the 128x128 phase (32x32 = 1024 tokens) the model is used at.
LOWRES = 64
# (steps, batches, lr and model config per family: families.py)
WEIGHT_DECAY = 0.05
WARMUP = 50


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * t))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="segvit", choices=sorted(FAMILIES))
    parser.add_argument("--lowres-steps", type=int, default=None, help="default: the family's recipe")
    parser.add_argument("--lowres-batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps at 128x128")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--stem", default=None, help="SegViT stem (trials)")
    parser.add_argument("--eval-every", type=int, default=0, help="held-out mIoU every N steps (trials)")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--out-dir", default=HERE, help="where segvit.pt / train_log.json go")
    parser.add_argument("--log-every", type=int, default=25)
    args = parser.parse_args(argv)
    family = FAMILIES[args.family]
    for name in ("lowres_steps", "lowres_batch", "steps", "batch", "lr"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(family, name))

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    model_config = dict(family.model_config)
    if args.stem is not None:
        model_config["stem"] = args.stem
    model = family.build(**model_config)
    n_params = sum(p.numel() for p in model.parameters())
    # biases, norms and position embeddings (segvit/sam pos_embed, sam's rel_pos_h/w tables) are not decayed
    decayed = {n for n, p in model.named_parameters() if p.ndim >= 2 and "pos" not in n.rsplit(".", 1)[-1]}
    decay = [p for n, p in model.named_parameters() if n in decayed]
    no_decay = [p for n, p in model.named_parameters() if n not in decayed]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.99),
    )
    # an optional first phase at an even lower resolution (sam: 32 px, 16 x 16 tokens)
    pre_steps, pre_size, pre_batch = family.pre_phase
    total = pre_steps + args.lowres_steps + args.steps
    print(
        f"{family.build.__name__} {n_params} params; "
        + (f"{pre_steps} steps x batch {pre_batch} at {pre_size}px, " if pre_steps else "")
        + f"{args.lowres_steps} steps x batch {args.lowres_batch} at {LOWRES}px, "
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
        pre = step < pre_steps
        low = pre_steps <= step < pre_steps + args.lowres_steps
        if pre_steps and step == pre_steps:
            phase_s["preres"] = time.perf_counter() - t0
        if step == pre_steps + args.lowres_steps:
            phase_s["lowres"] = time.perf_counter() - t0 - phase_s.get("preres", 0.0)
        td = time.perf_counter()
        if pre:
            images, labels = make_batch(TRAIN_SEED_BASE + step, pre_batch, pre_size)
        elif low:
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
            res = pre_size if pre else LOWRES if low else 128
            print(f"step {step + 1:5d}/{total} ({res}px)  loss {value:.4f}  ema {ema:.4f}  {el:7.1f}s", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            model.eval()
            ious = iou_per_class(confusion(predict(model, images_h).argmax(1), labels_h))
            model.train()
            print(f"    held-out(32) mIoU {float(ious.nanmean()):.4f} {[round(float(v), 3) for v in ious]}", flush=True)
    train_s = time.perf_counter() - t0
    phase_s["highres"] = train_s - phase_s.get("lowres", 0.0) - phase_s.get("preres", 0.0)

    model.eval()
    images, labels = heldout(family.heldout_n)
    te = time.perf_counter()
    pred = predict(model, images).argmax(1)
    ious = iou_per_class(confusion(pred, labels))
    eval_s = time.perf_counter() - te
    m = float(ious.nanmean())
    print(f"held-out mIoU {m:.4f}  per class {[round(float(v), 4) for v in ious]}  ({eval_s:.1f}s)")

    os.makedirs(args.out_dir, exist_ok=True)
    weights = os.path.join(args.out_dir, family.weights)
    torch.save(model.state_dict(), weights)
    log = {
        "command": "python -m benchmarks.fidelity.train" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(argv if argv is not None else sys.argv[1:])),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": args.threads,
        **({} if family.name == "segvit" else {"family": family.name}),
        family.kwargs_key: model_config,
        "params": n_params,
        "weights_bytes": os.path.getsize(weights),
        **({"pre_phase": {"px": pre_size, "steps": pre_steps, "batch": pre_batch}} if pre_steps else {}),
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
        "heldout": {"seed": HELDOUT_SEED, "n": family.heldout_n},
        "heldout_miou": round(m, 4),
        "heldout_iou_per_class": [round(float(v), 4) for v in ious],
        "loss_curve_every_50": [round(sum(losses[i : i + 50]) / len(losses[i : i + 50]), 4) for i in range(0, len(losses), 50)],
    }
    with open(os.path.join(args.out_dir, family.train_log), "w") as f:
        json.dump(log, f, indent=2)
        f.write("\n")
    print(f"wrote {weights} ({log['weights_bytes'] / 1e6:.2f} MB), train wall {train_s:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
