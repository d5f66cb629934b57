"""Quality cost of grid attention on a trained dense-prediction ViT: ``python -m benchmarks.fidelity.evaluate``.

Loads the committed ``segvit.pt`` (trained by ``python -m benchmarks.fidelity.train``), builds the
fixed held-out set (its own seed, never used in training) and compares, side by side in one
process:

* stride 1 -- the unmodified model (eager), the reference;
* stride 2 and 4 -- the same weights, training-free, through the real backend:
  ``torch.compile(model, backend="gridattn", options={"stride": s}, dynamic=False)``;
* ``finetuned2`` -- a copy fine-tuned briefly (150 steps x 8 images, AdamW, lr 1e-4, BatchNorm
  statistics frozen) in train mode through
  ``torch.compile(model, backend="gridattn", options={"stride": 2, "distributing": "shuffle"})``,
  then evaluated in eval mode with ``options={"stride": 2}`` (and, as ``finetuned2@stride1``,
  without grid attention);
* ``control_ft1`` -- the control: the same fine-tuning (same batches, steps, schedule) without grid
  attention, evaluated at stride 1 and (``control_ft1@grid2``) training-free at stride 2. The
  committed model is not trained to convergence, so any extra training helps; the gap
  ``finetuned2`` vs ``control_ft1@grid2`` is what adapting to grid attention buys.

For each: mIoU, mIoU drop relative to the stride-1 model (``100 * (base - x) / base``), and how far
the output moved from the stride-1 model's (relative L2 error of the logits, fraction of pixels
whose argmax agrees). ``--no-finetune`` / ``--no-control`` skip the fine-tuning parts. Prints a
table, writes ``results.json`` and ``results.csv`` next to this file (``--out-dir`` to change), and
ends with one ``fidelity: ...`` summary line.

The helpers (:func:`load_model`, :func:`heldout`, :func:`miou`, :func:`predict`,
:func:`evaluate_logits`, :func:`compile_grid`) are importable by other scripts.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import time

import torch
import torch.nn.functional as F

import gridattn_fx

from .data import CLASSES, NUM_CLASSES, make_batch
from .metrics import HELDOUT_SEED, HELDOUT_SIZE, confusion, heldout, iou_per_class, miou
from .model import SegViT, predict

__all__ = [
    "WEIGHTS",
    "compile_grid",
    "evaluate_logits",
    "finetune",
    "heldout",
    "load_model",
    "miou",
    "predict",
]

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "segvit.pt")
EVAL_BATCH = 16  # the held-out size is a multiple of it: one static shape, one compilation
FINETUNE_SEED_BASE = 500_000  # fine-tuning batches: seeds disjoint from training and held-out
FINETUNE_STEPS = 150
FINETUNE_BATCH = 8
FINETUNE_LR = 1e-4


def load_model(path: str = WEIGHTS, **config) -> SegViT:
    """The trained SegViT in eval mode.

    The constructor arguments are the ``segvit_kwargs`` of the ``train_log.json`` next to the
    weights when there is one (SegViT's defaults otherwise), overridden by ``config``.
    """
    log = os.path.join(os.path.dirname(os.path.abspath(path)), "train_log.json")
    kwargs = {}
    if os.path.exists(log):
        with open(log) as f:
            kwargs = json.load(f).get("segvit_kwargs", {})
    model = SegViT(**{**kwargs, **config})
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def evaluate_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logits: torch.Tensor | None = None,
    num_classes: int = NUM_CLASSES,
) -> dict:
    """Quality of ``logits`` (N, C, H, W) against ``labels`` (N, H, W), and deviation from ``ref_logits``.

    Returns ``miou``, ``iou_per_class`` and, with a reference, ``rel_l2`` (||logits - ref|| /
    ||ref|| over everything) and ``pixel_agreement`` (fraction of pixels with the same argmax).
    """
    pred = logits.argmax(1)
    ious = iou_per_class(confusion(pred, labels, num_classes))
    out = {
        "miou": float(ious.nanmean()),
        "iou_per_class": [None if math.isnan(v) else float(v) for v in ious.tolist()],
        "pixel_accuracy": float((pred == labels).double().mean()),
    }
    if ref_logits is not None:
        diff = (logits.double() - ref_logits.double()).norm()
        out["rel_l2"] = float(diff / ref_logits.double().norm())
        out["pixel_agreement"] = float((pred == ref_logits.argmax(1)).double().mean())
    return out


def compile_grid(model, stride: int, **options):
    """``torch.compile(model, backend="gridattn", options={"stride": stride, **options}, dynamic=False)``."""
    return torch.compile(model, backend="gridattn", options={"stride": stride, **options}, dynamic=False)


def _report_summary() -> tuple[list[str], str]:
    """(rewritten module paths, one-line summary) from gridattn_fx.last_report()."""
    report = gridattn_fx.last_report()
    if report is None:
        return [], "no gridattn report (the backend did not run)"
    rewritten = [s.module_path for s in report.rewritten]
    skipped = [f"{s.module_path} ({s.reason})" for s in report.skipped]
    reasons = sorted({s.reason for s in report.rewritten})
    line = f"{len(rewritten)}/{len(report.sites)} sites rewritten: {', '.join(rewritten) or '-'}"
    if reasons:
        line += f" ({' | '.join(reasons)})"
    if skipped:
        line += f"; skipped: {'; '.join(skipped)}"
    if report.failure:
        line += f"; FAILURE: {report.failure}"
    return rewritten, line


def run_config(name: str, model, images, labels, ref_logits=None, stride: int = 1, options: dict | None = None):
    """Evaluate one configuration: eager ``model`` for stride 1 without options, else the gridattn backend."""
    torch._dynamo.reset()
    rewritten: list[str] = []
    t0 = time.perf_counter()
    if options is None:
        runner = model
        with torch.no_grad():
            model(images[:EVAL_BATCH])
        summary = "eager, unmodified"
    else:
        runner = compile_grid(model, stride, **options)
        with torch.no_grad():
            runner(images[:EVAL_BATCH])  # compiles
        rewritten, summary = _report_summary()
    warm_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    logits = predict(runner, images, EVAL_BATCH)
    eval_s = time.perf_counter() - t1
    res = evaluate_logits(logits, labels, ref_logits)
    res.update(
        name=name, stride=stride, options=options, sites_rewritten=rewritten, report=summary,
        first_call_s=round(warm_s, 1), eval_s=round(eval_s, 2),
    )
    print(f"[{name}] {summary}; first call {warm_s:.1f}s, {len(images)} images {eval_s:.1f}s", flush=True)
    return res, logits


def finetune(
    model: SegViT,
    stride: int = 2,
    distributing: str | None = "shuffle",
    steps: int = FINETUNE_STEPS,
    batch: int = FINETUNE_BATCH,
    lr: float = FINETUNE_LR,
    seed: int = 0,
    log_every: int = 25,
) -> tuple[SegViT, dict]:
    """Fine-tune a copy of ``model`` in train mode through the gridattn backend at ``stride``.

    ``stride=1`` is the control: the same data, steps and schedule, eager, without grid attention.
    ``distributing="shuffle"`` uses shuffle distributing (the paper's training-time grouping);
    ``None`` leaves the option out (straightforward grouping). BatchNorm layers stay in eval mode
    (frozen statistics). Returns (the fine-tuned copy in eval
    mode, a log dict).
    """
    torch._dynamo.reset()
    torch.manual_seed(seed)
    tuned = copy.deepcopy(model).train()
    # Small-batch fine-tuning: keep the stem's BatchNorm statistics (and affine use of them) as
    # trained; the module as a whole is in training mode, which is what shuffle distributing keys on.
    for m in tuned.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    if stride == 1:  # the control: the same fine-tuning without grid attention, eager
        options = None
        compiled = tuned
    else:
        options = {"stride": stride}
        if distributing is not None:
            options["distributing"] = distributing
        compiled = torch.compile(tuned, backend="gridattn", options=options, dynamic=False)
    opt = torch.optim.AdamW(tuned.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    losses = []
    t0 = time.perf_counter()
    report_line = None
    for step in range(steps):
        images, labels = make_batch(FINETUNE_SEED_BASE + step, batch)
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        loss = F.cross_entropy(compiled(images), labels)
        if report_line is None:
            report_line = "eager, no grid attention" if options is None else _report_summary()[1]
            print(f"[finetune s{stride}] {report_line}; first step {time.perf_counter() - t0:.1f}s", flush=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tuned.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"[finetune s{stride}] step {step + 1}/{steps} loss {losses[-1]:.4f} {time.perf_counter() - t0:.1f}s", flush=True)
    log = {
        "options": options,
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "schedule": f"linear warmup {warmup} steps, cosine to 0",
        "data_seeds": f"make_batch({FINETUNE_SEED_BASE} + step, {batch})",
        "wall_s": round(time.perf_counter() - t0, 1),
        "first_loss": round(losses[0], 4),
        "final_loss_mean_last_10": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "report": report_line,
    }
    torch._dynamo.reset()
    return tuned.eval(), log


def _drop(base: float, x: float) -> float:
    return 100.0 * (base - x) / base


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=WEIGHTS)
    parser.add_argument("--n", type=int, default=HELDOUT_SIZE, help=f"held-out images (multiple of {EVAL_BATCH})")
    parser.add_argument("--strides", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--no-finetune", action="store_true", help="skip the stride-2 fine-tuning")
    parser.add_argument(
        "--distributing", default="shuffle", choices=["shuffle", "none"],
        help="fine-tuning grouping: 'shuffle' (options distributing='shuffle') or 'none' (option left out)",
    )
    parser.add_argument(
        "--no-control", action="store_true",
        help="skip the control fine-tuning (same steps at stride 1, no grid attention)",
    )
    parser.add_argument("--finetune-steps", type=int, default=FINETUNE_STEPS)
    parser.add_argument("--finetune-lr", type=float, default=FINETUNE_LR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default=HERE)
    args = parser.parse_args(argv)
    if args.n % EVAL_BATCH:
        parser.error(f"--n must be a multiple of {EVAL_BATCH}")

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model = load_model(args.weights)
    images, labels = heldout(args.n)
    print(f"held-out: {args.n} images (seed {HELDOUT_SEED}), torch {torch.__version__}, {args.threads} threads", flush=True)

    rows = []
    base, ref = run_config("stride1", model, images, labels)
    base.update(rel_l2=0.0, pixel_agreement=1.0)
    rows.append(base)
    for s in args.strides:
        res, _ = run_config(f"grid{s}", model, images, labels, ref, stride=s, options={})
        rows.append(res)

    finetune_log = None
    if not args.no_finetune:
        distributing = None if args.distributing == "none" else args.distributing
        tuned, finetune_log = finetune(model, 2, distributing, steps=args.finetune_steps, lr=args.finetune_lr)
        res, _ = run_config("finetuned2", tuned, images, labels, ref, stride=2, options={})
        res["finetune"] = finetune_log
        rows.append(res)
        # the fine-tuned weights without grid attention, for reference (eager)
        res1, _ = run_config("finetuned2@stride1", tuned, images, labels, ref)
        rows.append(res1)
        if not args.no_control:
            control, control_log = finetune(model, 1, None, steps=args.finetune_steps, lr=args.finetune_lr)
            res_c, _ = run_config("control_ft1", control, images, labels, ref)
            res_c["finetune"] = control_log
            rows.append(res_c)
            res_c2, _ = run_config("control_ft1@grid2", control, images, labels, ref, stride=2, options={})
            rows.append(res_c2)

    base_miou = base["miou"]
    for r in rows:
        r["miou_drop_pct"] = _drop(base_miou, r["miou"])

    header = f"{'config':<20} {'stride':>6} {'mIoU':>7} {'drop %':>7} {'rel L2':>8} {'agree %':>8}  " + " ".join(
        f"{c[:6]:>6}" for c in CLASSES
    )
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        ious = " ".join("   nan" if v is None else f"{v:6.3f}" for v in r["iou_per_class"])
        print(
            f"{r['name']:<20} {r['stride']:>6} {r['miou']:7.4f} {r['miou_drop_pct']:7.2f} {r['rel_l2']:8.4f} "
            f"{100 * r['pixel_agreement']:8.2f}  {ious}"
        )
    total_s = time.perf_counter() - t_start
    print(f"\ntotal wall time {total_s:.0f}s")

    by = {r["name"]: r for r in rows}
    out = {
        "command": "python -m benchmarks.fidelity.evaluate" + ("" if not argv else " " + " ".join(argv)),
        "torch": torch.__version__,
        "threads": args.threads,
        "weights": os.path.relpath(args.weights, HERE),
        "heldout": {"seed": HELDOUT_SEED, "n": args.n},
        "finetune": finetune_log,
        "finetune_skipped": args.no_finetune,
        "wall_s": round(total_s, 1),
        "rows": rows,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    with open(os.path.join(args.out_dir, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "stride", "miou", "miou_drop_pct", "rel_l2", "pixel_agreement"] + [f"iou_{c}" for c in CLASSES])
        for r in rows:
            w.writerow(
                [r["name"], r["stride"], f"{r['miou']:.4f}", f"{r['miou_drop_pct']:.2f}", f"{r['rel_l2']:.5f}",
                 f"{r['pixel_agreement']:.5f}"] + ["" if v is None else f"{v:.4f}" for v in r["iou_per_class"]]
            )

    def fmt_drop(name: str) -> str:
        return f"{by[name]['miou_drop_pct']:.2f}%" if name in by else "n/a"

    grid2 = by.get("grid2")
    print(
        f"fidelity: base_miou={base_miou:.4f} grid2_miou={grid2['miou']:.4f} "
        if grid2 else f"fidelity: base_miou={base_miou:.4f} grid2_miou=n/a ",
        end="",
    )
    print(f"grid2_drop={fmt_drop('grid2')} grid4_drop={fmt_drop('grid4')} finetuned2_drop={fmt_drop('finetuned2')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
