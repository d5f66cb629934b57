"""Quality at equal FLOPs: the configuration ``calibrate()`` chooses within the FLOPs of uniform
stride 2, against uniform stride 2 (the paper's), scored on held-out images.

    python -m benchmarks.fidelity.evaluate            # prints a quality: line after each fidelity: line
    python -m benchmarks.fidelity.quality --family segvit   # this part alone

For one family: ``gridattn_fx.calibrate`` runs on ``CALIBRATION_IMAGES`` images (seed
``CALIBRATION_SEED``, neither training nor held-out) with the relative mIoU drop as its metric and
``max_flops_ratio=0.25``, choosing per site among dense, grid and window grouping, per-head
groupings (half the heads on the grid, half in windows, both orders) and strides 2 and 4. The chosen
configuration and the ablation rows are scored on the family's quality held-out set (seed
``HELDOUT_SEED``, enough images that the 95% interval of the drop is below one point):

* ``grid2``: uniform grid stride 2, the paper's configuration (flops_ratio 0.25);
* ``window2`` / ``mixed2``: uniform window grouping / per-head groupings (grid on sites whose heads
  do not split in two) at stride 2 (same FLOPs);
* ``grid2+pool``: uniform grid stride 2 with shared tokens pooled over 4 x 4 windows (more FLOPs);
* ``calibrated-grouping``: calibration choosing among grid / window per site and strides only;
* ``calibrated``: the full choice, the row the ``quality:`` line reports.

Sites the family's preset leaves dense stay dense; every ratio is over the attention FLOPs of
dense attention at the sites the preset lets the pass rewrite.
"""

from __future__ import annotations

import argparse
import time

import torch

import gridattn_fx
from gridattn_fx.tools.calibrate import compact_choice

from .data import make_batch
from .evaluate import CALIBRATION_SEED, EVAL_BATCH, _drop, bootstrap_drop, load_family, miou_drop_metric
from .families import FAMILIES, Family
from .metrics import heldout, miou, per_image_confusion
from .model import predict

CALIBRATION_IMAGES = 8                     # the bound: at most 8 calibration inputs
MAX_FLOPS_RATIO = 0.25                     # the attention FLOPs of uniform stride 2
MIXED = ("grid", "window")
GROUPINGS = ("grid", "window", MIXED, ("window", "grid"))
POOL = 4


def _rows(family: Family) -> dict[str, dict]:
    """The ablation's fixed configurations: backend options on top of the family's preset."""
    return {
        "grid2": {"stride": 2},
        "window2": {"stride": 2, "grouping": "window"},
        "mixed2": {"stride": 2, "grouping": MIXED},   # grid on sites whose heads do not split
        "grid2+pool": {"stride": 2, "shared_pool": POOL},
    }


def _score(model, config, images, labels, ref_pred, base_conf, base_miou):
    """(held-out drop %, CI half-width, flops ratio, report) of ``config`` run through rewrite()."""
    gm, report = gridattn_fx.rewrite(model, (images[:EVAL_BATCH],), config)
    pred = predict(gm, images, EVAL_BATCH).argmax(1)
    drop = _drop(base_miou, miou(pred, labels))
    _, ci = bootstrap_drop(base_conf, per_image_confusion(pred, labels))
    return drop, ci, report, (pred == ref_pred).double().mean().item()


def _ratio(report, eligible: set[str]) -> float:
    """Attention FLOPs of the configuration over dense attention's, at the sites the preset lets the
    pass rewrite (``eligible``: their module paths), read from one report (one batch size)."""
    sites = [s for s in report.sites if s.module_path in eligible]
    before = sum(s.flops_before or 0 for s in sites)
    after = sum((s.flops_after if s.decision == "rewritten" else s.flops_before) or 0 for s in sites)
    return after / max(before, 1)


def _describe(report) -> str:
    """The rewritten sites' options in :meth:`Calibration.describe`'s format."""
    return ",".join(f"{s.module_path}={compact_choice(s.stride, s.grouping, s.shared_pool)}" for s in report.rewritten)


def _calibrate(model, family: Family, groupings, cal_x, cal_y):
    t0 = time.perf_counter()
    cal = gridattn_fx.calibrate(model, [(cal_x,)], strides=(1, 2, 4), groupings=groupings,
                                max_flops_ratio=MAX_FLOPS_RATIO, metric=miou_drop_metric(cal_y), **family.options)
    return cal, time.perf_counter() - t0


def quality_family(family: Family, model=None, n: int | None = None) -> dict:
    """Every row of the equal-FLOPs study for one family; returns them with the ``quality:`` line."""
    model = model if model is not None else load_family(family)
    n = n or family.quality_n
    images, labels = heldout(n)
    t0 = time.perf_counter()
    ref_pred = predict(model, images, EVAL_BATCH).argmax(1)
    base_miou = miou(ref_pred, labels)
    base_conf = per_image_confusion(ref_pred, labels)
    print(f"[quality {family.name}] held-out {n} images, dense mIoU {base_miou:.4f} "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    cal_x, cal_y = make_batch(CALIBRATION_SEED, CALIBRATION_IMAGES)

    calibrations = {}
    for name, groupings in (("calibrated-grouping", ("grid", "window")), ("calibrated", GROUPINGS)):
        cal, seconds = _calibrate(model, family, groupings, cal_x, cal_y)
        calibrations[name] = (cal, seconds)
        print(f"[quality {family.name}] {name}: {cal.describe()} (calibration drop {100 * cal.error:.2f}%, "
              f"flops_ratio {cal.flops_ratio:.3f}, {seconds:.0f}s)", flush=True)
    full = calibrations["calibrated"][0]
    eligible = set(full.site_strides)
    # per-head groupings where the site's heads split (calibration measured them there), grid elsewhere
    splits = {o.path for o in full.options_measured if o.grouping == MIXED and o.stride == (2, 2)}
    configs: dict[str, tuple[gridattn_fx.GridAttnConfig, str]] = {}
    for name, options in _rows(family).items():
        if options.get("grouping") == MIXED:
            options = {**options, "grouping": "grid", "site_groupings": {p: MIXED for p in splits}}
        configs[name] = (gridattn_fx.GridAttnConfig().with_options(**{**family.options, **options}), "")
    for name, (cal, _) in calibrations.items():
        configs[name] = (cal.config, cal.describe())

    rows = []
    for name, (config, described) in configs.items():
        drop, ci, report, agree = _score(model, config, images, labels, ref_pred, base_conf, base_miou)
        ratio = _ratio(report, eligible)
        skipped = [f"{s.module_path}: {s.reason}" for s in report.skipped if s.skip and s.skip.name == "GROUPING"]
        rows.append({"name": name, "drop_pct": drop, "ci95": ci, "flops_ratio": ratio,
                     "config": described or _describe(report),
                     "pixel_agreement": agree, "left_dense_by_option": skipped})
        print(f"[quality {family.name}] {name:<20} flops_ratio {ratio:.3f}  drop {drop:6.2f}% +-{ci:.2f}"
              + (f"  (left dense: {'; '.join(skipped)})" if skipped else ""), flush=True)
    chosen = next(r for r in rows if r["name"] == "calibrated")
    line = (f"quality: family={family.name} flops_ratio={chosen['flops_ratio']:.3f} "
            f"equal_flops_drop={chosen['drop_pct']:.2f}% (+-{chosen['ci95']:.2f}) config={chosen['config']}")
    return {"family": family.name, "heldout_n": n, "base_miou": base_miou, "rows": rows,
            "calibration_images": {"seed": CALIBRATION_SEED, "n": CALIBRATION_IMAGES},
            "calibration_seconds": {k: round(s, 1) for k, (_, s) in calibrations.items()},
            "wall_s": round(time.perf_counter() - t0, 1), "line": line}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--n", type=int, default=None, help="held-out images (default per family)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [quality_family(FAMILIES[name], n=args.n)["line"] for name in args.family]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
