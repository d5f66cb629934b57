"""The ``demo`` command: inductor vs gridattn on the built-in high-resolution ViT.

Compiles the same model twice in one process -- ``torch.compile(backend="inductor")`` as the
baseline and ``torch.compile(backend="gridattn", options={"stride": G})`` as the candidate --
shows the rewrite report, then measures both interleaved (baseline, candidate, baseline, ...)
and prints the median latency, the speed ratio, how far the outputs differ (grid attention is an
approximation by design, so this is informational) and the attention FLOPs before and after.

This module is the command-line front end: it writes its output through ``echo`` (``print`` by
default); the library proper only logs.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..report import last_report
from .demo_model import build_demo_model
from .target import DTYPES, Target, sdpa_kernels

__all__ = ["DemoResult", "run_demo", "QUICK_IMAGE_SIZE"]

#: image size used by ``--quick``: 32x32 = 1024 image tokens, exactly the default
#: ``min_image_tokens``, so the sites are still rewritten with the default policy.
QUICK_IMAGE_SIZE = 512


@dataclass
class DemoResult:
    """What the demo measured (returned by :func:`run_demo` for programmatic use)."""

    image_size: int
    stride: int
    runs: int
    warmup: int
    compile_s: dict[str, float] = field(default_factory=dict)
    times_ms: dict[str, list[float]] = field(default_factory=dict)
    median_ms: dict[str, float] = field(default_factory=dict)
    max_abs_diff: float = float("nan")
    mean_abs_diff: float = float("nan")
    max_abs_diff_vs_eager: dict[str, float] = field(default_factory=dict)
    flops_before: Optional[int] = None
    flops_after: Optional[int] = None
    rewritten: int = 0
    sites: int = 0
    failure: Optional[str] = None
    report: Any = None
    device: str = "cpu, float32"
    peak_mib: dict[str, float] = field(default_factory=dict)
    sdpa: dict[str, str] = field(default_factory=dict)   # SDPA kernels one call ran, per backend

    @property
    def speedup(self) -> float:
        return self.median_ms["inductor"] / self.median_ms["gridattn"]


def _fmt_flops(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} FLOP"


def _sum_flops(report: Any) -> tuple[Optional[int], Optional[int]]:
    """Attention FLOPs over all sites of the report: before, and after the rewrite.

    A skipped site costs the same after as before.
    """
    flops = getattr(report, "flops", None)
    if callable(flops) and getattr(report, "sites", None):
        before, after = flops()
        return int(before), int(after)
    before = after = 0
    seen = False
    for site in getattr(report, "sites", []) or []:
        fb = getattr(site, "flops_before", None)
        fa = getattr(site, "flops_after", None)
        if fb is None:
            continue
        seen = True
        before += int(fb)
        if getattr(site, "decision", None) == "rewritten" and fa is not None:
            after += int(fa)
        else:
            after += int(fa) if fa is not None else int(fb)
    return (before, after) if seen else (None, None)




_BACKENDS = ("inductor", "gridattn")


def run_demo(
    image_size: int = 1024,
    stride: int = 2,
    runs: int = 10,
    warmup: int = 2,
    *,
    min_image_tokens: Optional[int] = None,
    implementation: Optional[str] = None,
    model_kwargs: Optional[dict[str, Any]] = None,
    device: str = "cpu",
    dtype: str = "float32",
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Run the demo and return what it measured; progress and tables go to ``echo``."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    target = Target.parse(device, dtype)

    model, x = build_demo_model(image_size, **(model_kwargs or {}))
    model, x = target.place(model.eval()), target.place_inputs(x)
    options: dict[str, Any] = {"stride": stride}
    if min_image_tokens is not None:
        options["min_image_tokens"] = min_image_tokens
    if implementation is not None:
        options["implementation"] = implementation
    _echo_setup(model, image_size, target, echo)

    result = DemoResult(image_size=image_size, stride=stride, runs=runs, warmup=warmup, device=target.describe())
    torch._dynamo.reset()
    compiled = {"inductor": torch.compile(model, backend="inductor"),
                "gridattn": torch.compile(model, backend="gridattn", options=options)}
    with torch.no_grad():
        eager_out = model(x)
        outputs = _compile(compiled, x, options, result, echo)
        _echo_report(result, stride, echo)
        times = _time_interleaved(compiled, x, runs, warmup, outputs, target)
        for name in _BACKENDS:
            result.peak_mib[name] = target.peak_bytes(lambda: compiled[name](x)) / 2**20
            result.sdpa[name] = sdpa_kernels(lambda: compiled[name](x))

    result.times_ms = times
    result.median_ms = {name: statistics.median(ts) for name, ts in times.items()}
    diff = (outputs["gridattn"].double() - outputs["inductor"].double()).abs()
    result.max_abs_diff = float(diff.max())
    result.mean_abs_diff = float(diff.mean())
    for name in _BACKENDS:
        result.max_abs_diff_vs_eager[name] = float((outputs[name].double() - eager_out.double()).abs().max())
    _echo_latency(result, times, echo)
    _echo_outputs_and_flops(result, float(outputs["inductor"].abs().max()), echo)
    return result


def _echo_setup(model, image_size: int, target: Target, echo) -> None:
    g = model.grid_size
    echo(
        f"gridattn-fx demo: DemoViT on a {image_size}x{image_size} image -> {g}x{g} = {g * g} image "
        f"tokens + 1 cls token, {len(model.blocks)} blocks, width {model.pos_embed.shape[-1]}, "
        f"{model.blocks[0].attn.num_heads} heads, batch 1"
    )
    echo(f"torch {torch.__version__}, {torch.get_num_threads()} threads ({os.cpu_count()} CPUs), "
         f"device {target.describe()}")
    echo("")


def _compile(compiled: dict, x, options: dict, result: DemoResult, echo) -> dict[str, torch.Tensor]:
    """The first call of each compiled model (compilation happens there), timed."""
    labels = {
        "inductor": 'torch.compile(model, backend="inductor")',
        "gridattn": f'torch.compile(model, backend="gridattn", options={options!r})',
    }
    outputs: dict[str, torch.Tensor] = {}
    for i, name in enumerate(_BACKENDS, start=1):
        echo(f"[{i}/2] compiling {labels[name]} ...")
        t0 = time.perf_counter()
        outputs[name] = compiled[name](x)
        result.compile_s[name] = time.perf_counter() - t0
        echo(f"      done in {result.compile_s[name]:.1f} s (first call, includes compilation)")
    return outputs


def _echo_report(result: DemoResult, stride: int, echo) -> None:
    report = last_report()
    result.report = report
    echo("")
    echo(f"Rewrite report (gridattn_fx.last_report(), stride {stride}):")
    echo(str(report) if report is not None else "  (no report: the gridattn backend compiled no graph)")
    echo("")
    if report is not None:
        result.sites = len(report.sites)
        result.rewritten = len(report.rewritten)
        result.failure = report.failure
        result.flops_before, result.flops_after = _sum_flops(report)
    if result.failure:
        echo(f"WARNING: the gridattn pass failed and the original graph was compiled instead: {result.failure}")
        echo("")
    elif report is not None and result.rewritten == 0:
        echo("NOTE: no attention site was rewritten (see the reasons above).")
        echo("")


def _time_interleaved(compiled: dict, x, runs: int, warmup: int, outputs: dict,
                      target: Target) -> dict[str, list[float]]:
    """Warm-up (beyond the compiling call), then interleaved timed runs with ``target``'s clock
    (CUDA events on a GPU); ``outputs`` keeps the last."""
    for _ in range(warmup):
        for name in _BACKENDS:
            compiled[name](x)
    target.synchronize()
    times: dict[str, list[float]] = {name: [] for name in _BACKENDS}
    for _ in range(runs):
        for name in _BACKENDS:
            def call(name=name):
                outputs[name] = compiled[name](x)
            times[name].append(target.time_ms(call))
    return times


def _echo_latency(result: DemoResult, times: dict, echo) -> None:
    base, runs, warmup = result.median_ms["inductor"], result.runs, result.warmup
    echo(
        f"Latency on {result.device}: batch 1, median of {runs} interleaved runs each "
        f"(after {warmup} warm-up run{'s' if warmup != 1 else ''} each), torch.no_grad, eval mode"
    )
    rows = [("backend", "median ms", "min ms", "ratio vs inductor", "speedup", "max |out - eager|", "peak MiB",
             "sdpa kernels")]
    for name in _BACKENDS:
        med = result.median_ms[name]
        rows.append((
            name if name == "inductor" else f"gridattn (stride {result.stride})",
            f"{med:.1f}",
            f"{min(times[name]):.1f}",
            f"{med / base:.3f}",
            f"{base / med:.2f}x",
            f"{result.max_abs_diff_vs_eager[name]:.3g}",
            f"{result.peak_mib[name]:.1f}",
            result.sdpa[name] or "-",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        echo("  " + "  ".join(cells))
        if j == 0:
            echo("  " + "  ".join("-" * w for w in widths))
    spreads = {name: max(ts) / min(ts) for name, ts in times.items() if min(ts) > 0}
    noisy = [name for name, spread in spreads.items() if spread > 1.3]
    if noisy:
        echo(
            "  NOTE: large run-to-run spread ("
            + ", ".join(f"{name} max/min {spreads[name]:.1f}x" for name in noisy)
            + "): the CPU may be busy with another process; rerun, or raise --runs"
        )
    echo("")


def _echo_outputs_and_flops(result: DemoResult, out_scale: float, echo) -> None:
    echo(
        f"Output difference gridattn vs inductor: max abs {result.max_abs_diff:.3g}, "
        f"mean abs {result.mean_abs_diff:.3g} (outputs reach |{out_scale:.3g}|; informational: "
        "grid attention restricts each image token to its own grid group by design)"
    )
    if result.flops_before is None:
        echo("Attention FLOPs: not available from the report")
        return
    if result.flops_after == result.flops_before:
        ratio = " (unchanged)"
    elif result.flops_after:
        ratio = f" ({result.flops_before / result.flops_after:.2f}x fewer)"
    else:
        ratio = ""
    echo(
        f"Attention FLOPs ({result.sites} sites, {result.rewritten} rewritten): "
        f"{_fmt_flops(result.flops_before)} -> {_fmt_flops(result.flops_after)}{ratio}"
    )


def add_demo_arguments(parser: Any) -> None:
    """Register the ``demo`` subcommand's arguments on an argparse (sub)parser."""

    def positive_int(text: str) -> int:
        value = int(text)
        if value < 1:
            raise _arg_error(f"must be >= 1, got {value}")
        return value

    def nonneg_int(text: str) -> int:
        value = int(text)
        if value < 0:
            raise _arg_error(f"must be >= 0, got {value}")
        return value

    def runs_int(text: str) -> int:
        value = int(text)
        if value < 5:
            raise _arg_error(f"must be >= 5 (a median of fewer runs is noise), got {value}")
        return value

    parser.add_argument(
        "--image-size", type=positive_int, default=None, metavar="N",
        help="square input image size in pixels, a multiple of 16 (default 1024; "
        f"{QUICK_IMAGE_SIZE} with --quick)",
    )
    parser.add_argument(
        "--stride", type=positive_int, default=2, metavar="G",
        help="grid stride G: attention within G*G interleaved groups (default 2)",
    )
    parser.add_argument(
        "--runs", type=runs_int, default=None, metavar="K",
        help="timed runs per backend, interleaved; the median is reported (>= 5; default 10, "
        "5 with --quick)",
    )
    parser.add_argument(
        "--warmup", type=nonneg_int, default=None, metavar="W",
        help="warm-up runs per backend after compilation (default 2, 1 with --quick)",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help=f"small image ({QUICK_IMAGE_SIZE}x{QUICK_IMAGE_SIZE}) and fewer runs: finishes quickly",
    )
    parser.add_argument(
        "--min-image-tokens", type=nonneg_int, default=None, metavar="T",
        help="gridattn option min_image_tokens (default: the library's default)",
    )
    parser.add_argument(
        "--implementation", choices=("grouped", "masked"), default=None,
        help="gridattn option implementation (default: the library's default)",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu",
        help="where the model runs (default cpu); on cuda, CUDA events time the runs",
    )
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default="float32",
        help="the model's and the input's dtype (default float32)",
    )


def _arg_error(message: str) -> Exception:
    import argparse

    return argparse.ArgumentTypeError(message)


def demo_from_args(args: Any, echo: Callable[[str], None] = print) -> int:
    """Run the demo from parsed ``demo`` arguments; returns the process exit code."""
    image_size = args.image_size or (QUICK_IMAGE_SIZE if args.quick else 1024)
    runs = args.runs if args.runs is not None else (5 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if image_size % 16 != 0:
        echo(f"error: --image-size must be a multiple of 16 (the patch size), got {image_size}")
        return 2
    try:
        Target.parse(args.device, args.dtype)
    except ValueError as err:
        echo(f"error: {err}")
        return 2
    result = run_demo(
        device=args.device,
        dtype=args.dtype,
        image_size=image_size,
        stride=args.stride,
        runs=runs,
        warmup=warmup,
        min_image_tokens=args.min_image_tokens,
        implementation=args.implementation,
        echo=echo,
    )
    return 1 if result.failure else 0
