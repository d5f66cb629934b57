"""Quality cost of grid attention on trained dense-prediction models: ``python -m benchmarks.fidelity.evaluate``.

For every family of ``families.py`` in turn (``--family`` to choose; segvit first), loads its
committed weights (trained by ``python -m benchmarks.fidelity.train --family NAME``), builds the
fixed held-out set (its own seed, never used in training) and compares, side by side in one
process (described here for segvit; the other families use their preset's options with the stride,
their own held-out size and fine-tuning budget, and run the grid configurations through
``gridattn_fx.rewrite`` instead of torch.compile, see ``Family.engine``):

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
whose argmax agrees), with the 95% bootstrap interval of the drop over the held-out images; then
``gridattn_fx.calibrate`` with the mIoU drop as metric under a 0.5% budget (``--no-calibrate``).
``--no-finetune`` / ``--no-control`` skip the fine-tuning parts; ``--finetune-seeds K`` repeats the
fine-tuning and its control with K seeds (own batches and shuffle draws each) and reports the mean
and spread of both drops and of their difference. Prints a table per family, writes
``results.json`` / ``results.csv`` (segvit) and ``results_<family>.json`` / ``.csv`` next to this
file (``--out-dir`` to change), and ends with one ``fidelity: ...`` summary line per family, each
followed by its ``quality: ...`` line: the configuration ``calibrate()`` chooses within the attention
FLOPs of uniform stride 2, scored on held-out images (``quality.py``; ``--no-quality`` skips it).

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
from .families import FAMILIES, Family
from .metrics import HELDOUT_SEED, confusion, heldout, iou_per_class, miou, per_image_confusion
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
FINETUNE_SEED_STRIDE = 10_000  # run k (--finetune-seeds) uses batches FINETUNE_SEED_BASE + 10000 k + step
FINETUNE_STEPS = 150
FINETUNE_BATCH = 8
FINETUNE_LR = 1e-4
CALIBRATION_SEED = 2_000_003   # neither a training seed (0, 1, ...) nor the held-out one
CALIBRATION_BUDGET_PCT = 0.5   # calibrate(): at most 0.5% relative mIoU drop on the calibration images
BOOTSTRAP_DRAWS = 200          # held-out resamples for the noise of each drop


def load_model(path: str = WEIGHTS, **config) -> SegViT:
    """The trained SegViT in eval mode (:func:`load_family` for ``segvit``), constructor arguments
    overridden by ``config``."""
    return load_family(FAMILIES["segvit"], path, **config)


def load_family(family: Family, path: str | None = None, **config) -> torch.nn.Module:
    """A family's trained model in eval mode.

    The constructor arguments are the ones its training log next to the weights records (the
    family's ``model_config`` when there is no log), overridden by ``config``.
    """
    path = path or os.path.join(HERE, family.weights)
    log = os.path.join(os.path.dirname(os.path.abspath(path)), family.train_log)
    kwargs = dict(family.model_config)
    if os.path.exists(log):
        with open(log) as f:
            kwargs = json.load(f).get(family.kwargs_key, kwargs)
    model = family.build(**{**kwargs, **config})
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
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


def _report_summary(report=None) -> tuple[list[str], str]:
    """(rewritten module paths, one-line summary) from ``report`` (default gridattn_fx.last_report())."""
    report = report if report is not None else gridattn_fx.last_report()
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


def grid_config(stride: int, options: dict) -> gridattn_fx.GridAttnConfig:
    return gridattn_fx.GridAttnConfig().with_options(**{**options, "stride": stride})


def run_config(name: str, model, images, labels, ref_logits=None, stride: int = 1, options: dict | None = None,
               engine: str = "compile"):
    """Evaluate one configuration: eager ``model`` for stride 1 without options, else the gridattn pass:
    through the backend (``engine="compile"``: torch.compile, inductor) or ``gridattn_fx.rewrite``
    (``engine="rewrite"``: the same pass, the rewritten graph run eagerly)."""
    torch._dynamo.reset()
    rewritten: list[str] = []
    t0 = time.perf_counter()
    if options is None:  # eager: nothing to build, so no warm-up call (it cost ~15 s per sam row)
        runner = model
        summary = "eager, unmodified"
    elif engine == "rewrite":
        runner, report = gridattn_fx.rewrite(model, (images[:EVAL_BATCH],), grid_config(stride, options))
        rewritten, summary = _report_summary(report)
        summary = "rewrite(): " + summary
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


def finetune_data_seed(seed: int) -> int:
    """First data seed of fine-tuning run ``seed``: run k draws its batches from its own block of seeds."""
    return FINETUNE_SEED_BASE + FINETUNE_SEED_STRIDE * seed


def finetune(
    model: SegViT,
    stride: int = 2,
    distributing: str | None = "shuffle",
    steps: int = FINETUNE_STEPS,
    batch: int = FINETUNE_BATCH,
    lr: float = FINETUNE_LR,
    seed: int = 0,
    log_every: int = 25,
    base_options: dict | None = None,
    engine: str = "compile",
) -> tuple[SegViT, dict]:
    """Fine-tune a copy of ``model`` in train mode through the gridattn backend at ``stride``.

    ``stride=1`` is the control: the same data, steps and schedule, eager, without grid attention.
    ``distributing="shuffle"`` uses shuffle distributing (the paper's training-time grouping);
    ``None`` leaves the option out (straightforward grouping). BatchNorm layers stay in eval mode
    (frozen statistics). ``base_options`` (a family's preset) go to the backend with the stride.
    ``engine="rewrite"`` runs the pass once through ``gridattn_fx.rewrite`` on the training-mode
    copy (shuffle distributing is then drawn afresh at every call of the returned graph, which shares
    the copy's parameters) instead of torch.compile: no inductor compilation.
    Returns (the fine-tuned copy in eval mode, a log dict).
    """
    torch._dynamo.reset()
    torch.manual_seed(seed)
    tuned = copy.deepcopy(model).train()
    # Small-batch fine-tuning: keep the stem's BatchNorm statistics (and affine use of them) as
    # trained; the module as a whole is in training mode, which is what shuffle distributing keys on.
    for m in tuned.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    report = None
    if stride == 1:  # the control: the same fine-tuning without grid attention, eager
        options = None
        compiled = tuned
    else:
        options = {**(base_options or {}), "stride": stride}
        if distributing is not None:
            options["distributing"] = distributing
        if engine == "rewrite":
            example, _ = make_batch(finetune_data_seed(seed), batch)
            compiled, report = gridattn_fx.rewrite(tuned, (example,), grid_config(stride, options))
        else:
            compiled = torch.compile(tuned, backend="gridattn", options=options, dynamic=False)
    opt = torch.optim.AdamW(tuned.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    losses = []
    t0 = time.perf_counter()
    report_line = None
    for step in range(steps):
        images, labels = make_batch(finetune_data_seed(seed) + step, batch)
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        loss = F.cross_entropy(compiled(images), labels)
        if report_line is None:
            report_line = "eager, no grid attention" if options is None else _report_summary(report)[1]
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
        "seed": seed,
        "data_seeds": f"make_batch({finetune_data_seed(seed)} + step, {batch})",
        "wall_s": round(time.perf_counter() - t0, 1),
        "first_loss": round(losses[0], 4),
        "final_loss_mean_last_10": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "report": report_line,
        "engine": engine,
    }
    torch._dynamo.reset()
    return tuned.eval(), log



def _drop(base: float, x: float) -> float:
    return 100.0 * (base - x) / base


def bootstrap_drop(base_conf: torch.Tensor, conf: torch.Tensor, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> tuple[float, float]:
    """(std, half-width of the 95% interval) of the mIoU drop (%) when the held-out images are resampled.

    ``base_conf`` and ``conf`` are per-image confusions of the reference and the candidate on the same
    images; each draw resamples the images (with replacement) for both, so the spread is the noise of
    the held-out sample, paired.
    """
    g = torch.Generator().manual_seed(seed)
    n = base_conf.shape[0]
    idx = torch.randint(0, n, (draws, n), generator=g)
    drops = []
    for row in idx:
        b = float(iou_per_class(base_conf[row].sum(0)).nanmean())
        c = float(iou_per_class(conf[row].sum(0)).nanmean())
        drops.append(_drop(b, c))
    d = torch.tensor(drops, dtype=torch.float64)
    lo, hi = torch.quantile(d, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(d.std()), (hi - lo) / 2


def miou_drop_metric(labels: torch.Tensor):
    """``metric(reference_logits, logits)`` for calibrate(): the relative mIoU drop (a fraction) on ``labels``."""

    def metric(reference, output) -> float:
        base = miou(reference.argmax(1), labels)
        return (base - miou(output.argmax(1), labels)) / base

    return metric


def calibrate_family(model, family: Family, budget: float, samples: int, images, labels, base_miou: float, uniform_miou: dict):
    """calibrate() with the task metric (relative mIoU drop on calibration images) under ``budget``.

    The calibration images (seed CALIBRATION_SEED, neither training nor held-out) go in as one call so
    the metric sees all of them at once; the chosen strides are then scored on the held-out set.
    """
    cal_x, cal_y = make_batch(CALIBRATION_SEED, samples)
    t0 = time.perf_counter()
    cal = gridattn_fx.calibrate(
        model, [(cal_x,)], budget=budget, strides=(1, 2, 4), metric=miou_drop_metric(cal_y), **family.options
    )
    seconds = time.perf_counter() - t0
    fitting = [(saved, s) for s, (err, saved) in cal.uniform.items() if err <= budget]
    uni_saved, uni_stride = max(fitting, default=(0, (1, 1)))
    gm, _ = gridattn_fx.rewrite(model, (images[:EVAL_BATCH],), cal.config)
    cal_miou = miou(predict(gm, images, EVAL_BATCH).argmax(1), labels)
    out = {
        "budget_pct": 100 * budget,
        "metric": "relative mIoU drop on the calibration images",
        "calibration_images": {"seed": CALIBRATION_SEED, "n": samples},
        "site_strides": {p: f"{s[0]}x{s[1]}" for p, s in cal.site_strides.items()},
        "calibration_drop_pct": 100 * cal.error,
        "saved_pct": 100 * cal.saved_flops / max(cal.flops_before, 1),
        "uniform": {f"{s[0]}x{s[1]}": {"calibration_drop_pct": 100 * e, "saved_pct": 100 * sv / max(cal.flops_before, 1)}
                    for s, (e, sv) in cal.uniform.items()},
        "uniform_within_budget": f"{uni_stride[0]}x{uni_stride[1]}",
        "uniform_saved_pct": 100 * uni_saved / max(cal.flops_before, 1),
        "heldout_miou": cal_miou,
        "heldout_drop_pct": _drop(base_miou, cal_miou),
        "uniform_heldout_drop_pct": _drop(base_miou, uniform_miou.get(uni_stride[0], base_miou)),
        "seconds": round(seconds, 1),
    }
    strides = " ".join(out["site_strides"].values())
    print(f"[calibrate {family.name}] budget {out['budget_pct']:.1f}% mIoU: strides {strides}; "
          f"calibration drop {out['calibration_drop_pct']:.2f}%, saves {out['saved_pct']:.1f}% of attention FLOPs "
          f"(best uniform within budget: {out['uniform_within_budget']}, {out['uniform_saved_pct']:.1f}%); "
          f"held-out drop {out['heldout_drop_pct']:.2f}% ({seconds:.0f}s)", flush=True)
    return out


def evaluate_family(family: Family, args) -> dict:
    """Every configuration of one family side by side; prints its table and returns its results."""
    t_start = time.perf_counter()
    n = args.n or family.heldout_n
    weights = args.weights if (args.weights and family.name == "segvit") else os.path.join(args.weights_dir, family.weights)
    model = load_family(family, weights)
    images, labels = heldout(n)
    steps = args.finetune_steps or family.finetune_steps
    print(f"\n== {family.name}: {family.description}\nheld-out: {n} images (seed {HELDOUT_SEED}), "
          f"torch {torch.__version__}, {args.threads} threads, backend options {family.options or '{}'} + stride", flush=True)

    rows, preds = [], {}
    base, ref = run_config("stride1", model, images, labels)
    base.update(rel_l2=0.0, pixel_agreement=1.0)
    rows.append(base)
    preds["stride1"] = ref.argmax(1)
    uniform_miou = {1: base["miou"]}
    for s in args.strides:
        res, logits = run_config(f"grid{s}", model, images, labels, ref, stride=s, options=dict(family.options), engine=family.engine)
        rows.append(res)
        preds[res["name"]] = logits.argmax(1)
        uniform_miou[s] = res["miou"]

    finetune_log = None
    if not args.no_finetune:
        distributing = None if args.distributing == "none" else args.distributing
        ft = dict(steps=steps, batch=family.finetune_batch, lr=args.finetune_lr, base_options=family.options,
                  engine=family.engine)
        tuned, finetune_log = finetune(model, 2, distributing, **ft)
        res, logits = run_config("finetuned2", tuned, images, labels, ref, stride=2, options=dict(family.options), engine=family.engine)
        res["finetune"] = finetune_log
        rows.append(res)
        preds[res["name"]] = logits.argmax(1)
        if family.name == "segvit" or args.all_rows:
            # the fine-tuned weights without grid attention, for reference (eager)
            res1, logits = run_config("finetuned2@stride1", tuned, images, labels, ref)
            rows.append(res1)
            preds[res1["name"]] = logits.argmax(1)
        if not args.no_control:
            control, control_log = finetune(model, 1, None, **ft)
            res_c, logits = run_config("control_ft1", control, images, labels, ref)
            res_c["finetune"] = control_log
            rows.append(res_c)
            preds[res_c["name"]] = logits.argmax(1)
            res_c2, logits = run_config("control_ft1@grid2", control, images, labels, ref, stride=2, options=dict(family.options), engine=family.engine)
            rows.append(res_c2)
            preds[res_c2["name"]] = logits.argmax(1)

    base_miou = base["miou"]
    seeds = None
    if not args.no_finetune and not args.no_control and args.finetune_seeds > 1:
        seeds = finetune_seed_study(model, family, args, ft, distributing, images, labels, ref, base_miou, rows)
    base_conf = per_image_confusion(preds["stride1"], labels)
    for r in rows:
        r["miou_drop_pct"] = _drop(base_miou, r["miou"])
        r["pixels_changed_pct"] = 100 * (1 - r["pixel_agreement"])
        if r["name"] != "stride1":
            std, ci = bootstrap_drop(base_conf, per_image_confusion(preds[r["name"]], labels))
            r["drop_bootstrap_std"], r["drop_ci95_halfwidth"] = std, ci

    calibration = None
    if not args.no_calibrate:
        calibration = calibrate_family(model, family, args.budget / 100, family.calibration_samples, images, labels,
                                       base_miou, uniform_miou)

    header = f"{'config':<20} {'stride':>6} {'mIoU':>7} {'drop %':>7} {'+-95%':>6} {'rel L2':>8} {'agree %':>8}  " + " ".join(
        f"{c[:6]:>6}" for c in CLASSES
    )
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        ious = " ".join("   nan" if v is None else f"{v:6.3f}" for v in r["iou_per_class"])
        ci = f"{r['drop_ci95_halfwidth']:6.2f}" if "drop_ci95_halfwidth" in r else "     -"
        print(
            f"{r['name']:<20} {r['stride']:>6} {r['miou']:7.4f} {r['miou_drop_pct']:7.2f} {ci} {r['rel_l2']:8.4f} "
            f"{100 * r['pixel_agreement']:8.2f}  {ious}"
        )
    total_s = time.perf_counter() - t_start
    print(f"{family.name}: wall time {total_s:.0f}s")

    out = {
        "family": family.name,
        "description": family.description,
        "command": "python -m benchmarks.fidelity.evaluate",
        "torch": torch.__version__,
        "threads": args.threads,
        "weights": os.path.relpath(weights, HERE),
        "backend_options": family.options,
        "engine": family.engine,
        "heldout": {"seed": HELDOUT_SEED, "n": n},
        "finetune": finetune_log,
        "finetune_skipped": args.no_finetune,
        "calibration": calibration,
        "finetune_seeds": seeds,
        "wall_s": round(total_s, 1),
        "rows": rows,
    }
    suffix = "" if family.name == "segvit" else f"_{family.name}"
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, f"results{suffix}.json"), "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    with open(os.path.join(args.out_dir, f"results{suffix}.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "stride", "miou", "miou_drop_pct", "rel_l2", "pixel_agreement"] + [f"iou_{c}" for c in CLASSES])
        for r in rows:
            w.writerow(
                [r["name"], r["stride"], f"{r['miou']:.4f}", f"{r['miou_drop_pct']:.2f}", f"{r['rel_l2']:.5f}",
                 f"{r['pixel_agreement']:.5f}"] + ["" if v is None else f"{v:.4f}" for v in r["iou_per_class"]]
            )
    out["summary"] = fidelity_line(family, rows)
    if not args.no_quality:   # quality.py: the configuration calibrate() chooses at the FLOPs of stride 2
        from .quality import quality_family

        quality = quality_family(family, model)
        out["quality"] = quality
        with open(os.path.join(args.out_dir, f"quality_{family.name}.json"), "w") as f:
            json.dump(quality, f, indent=2, default=str)
            f.write("\n")
    return out


def finetune_seed_study(model, family: Family, args, ft: dict, distributing, images, labels, ref, base_miou: float,
                        rows: list[dict]) -> dict:
    """Fine-tuning noise: the stride-2 fine-tuning and its control repeated with seeds 1..K-1.

    Seed k draws its own batches (``finetune_data_seed(k)``) and shuffle groups; seed 0 is the run
    already in ``rows``. Returns per-seed held-out drops of ``finetuned2`` and ``control_ft1@grid2``,
    and of their difference (what fine-tuning with grid attention buys over plain fine-tuning), with
    mean and sample standard deviation over the seeds.
    """
    by = {r["name"]: r for r in rows}
    tuned_drops = [_drop(base_miou, by["finetuned2"]["miou"])]
    control_drops = [_drop(base_miou, by["control_ft1@grid2"]["miou"])]
    for k in range(1, args.finetune_seeds):
        tuned, _ = finetune(model, 2, distributing, seed=k, **ft)
        res, _ = run_config(f"finetuned2 seed {k}", tuned, images, labels, ref, stride=2, options=dict(family.options),
                            engine=family.engine)
        tuned_drops.append(_drop(base_miou, res["miou"]))
        control, _ = finetune(model, 1, None, seed=k, **ft)
        res, _ = run_config(f"control_ft1@grid2 seed {k}", control, images, labels, ref, stride=2,
                            options=dict(family.options), engine=family.engine)
        control_drops.append(_drop(base_miou, res["miou"]))
    gaps = [c - t for t, c in zip(tuned_drops, control_drops)]

    def stats(xs: list[float]) -> dict:
        t = torch.tensor(xs, dtype=torch.float64)
        return {"per_seed": [round(x, 3) for x in xs], "mean": float(t.mean()), "std": float(t.std())}

    out = {"seeds": args.finetune_seeds, "finetuned2_drop_pct": stats(tuned_drops),
           "control_grid2_drop_pct": stats(control_drops), "recovery_pct": stats(gaps)}
    print(f"[{family.name} fine-tuning over {args.finetune_seeds} seeds] finetuned2 drop "
          f"{out['finetuned2_drop_pct']['mean']:.2f}% +-{out['finetuned2_drop_pct']['std']:.2f} (std), control@grid2 "
          f"{out['control_grid2_drop_pct']['mean']:.2f}% +-{out['control_grid2_drop_pct']['std']:.2f}, recovery "
          f"{out['recovery_pct']['mean']:.2f} +-{out['recovery_pct']['std']:.2f} points", flush=True)
    return out


def fidelity_line(family: Family, rows: list[dict]) -> str:
    """The one-line summary: today's keys (base_miou ... finetuned2_drop), then the family."""
    by = {r["name"]: r for r in rows}

    def fmt_drop(name: str) -> str:
        return f"{by[name]['miou_drop_pct']:.2f}%" if name in by else "n/a"

    grid2 = by.get("grid2")
    line = f"fidelity: base_miou={by['stride1']['miou']:.4f} "
    line += f"grid2_miou={grid2['miou']:.4f} " if grid2 else "grid2_miou=n/a "
    line += f"grid2_drop={fmt_drop('grid2')} grid4_drop={fmt_drop('grid4')} finetuned2_drop={fmt_drop('finetuned2')}"
    return line + ("" if family.name == "segvit" else f" family={family.name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", default=list(FAMILIES), choices=list(FAMILIES),
                        help="families to evaluate, in order (default: all; segvit first)")
    parser.add_argument("--weights", default=None, help="segvit weights (default: the committed segvit.pt)")
    parser.add_argument("--weights-dir", default=HERE, help="where the families' weights and train logs are (trials)")
    parser.add_argument("--n", type=int, default=None, help=f"held-out images (multiple of {EVAL_BATCH}; default per family)")
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
    parser.add_argument("--finetune-steps", type=int, default=None, help="default per family (families.py)")
    parser.add_argument("--finetune-lr", type=float, default=FINETUNE_LR)
    parser.add_argument("--finetune-seeds", type=int, default=1,
                        help="repeat the fine-tuning and its control with this many seeds (fine-tuning noise)")
    parser.add_argument("--all-rows", action="store_true", help="also finetuned2@stride1 for every family")
    parser.add_argument("--no-calibrate", action="store_true", help="skip calibrate() with the mIoU metric")
    parser.add_argument("--no-quality", action="store_true",
                        help="skip the equal-FLOPs study (quality.py) and its quality: line")
    parser.add_argument("--budget", type=float, default=CALIBRATION_BUDGET_PCT, help="calibration budget, %% mIoU drop")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default=HERE)
    args = parser.parse_args(argv)
    if args.finetune_seeds < 1:
        parser.error("--finetune-seeds must be at least 1")
    if args.n is not None and args.n % EVAL_BATCH:
        parser.error(f"--n must be a multiple of {EVAL_BATCH}")

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    results = [evaluate_family(FAMILIES[name], args) for name in args.family]
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f}s")
    for r in results:
        print(r["summary"])
        if "quality" in r:
            print(r["quality"]["line"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
