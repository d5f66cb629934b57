"""Measurement helpers shared by the benchmark cases: interleaved timing, compile timing, inductor's
generated code (kernel counts, copy kernels), tables, CSV and plots. What depends on the device
(the clock, peak memory, SDPA kernels) is in gridattn_fx/tools/target.py."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional
from unittest import mock

import torch

# ------------------------------------------------------------------------------------------------
# results


@dataclass
class Row:
    """One (case, size, configuration) measurement."""

    case: str
    size: str
    config: str
    median_ms: float = float("nan")
    min_ms: float = float("nan")
    max_ms: float = float("nan")
    runs: int = 0
    ratio_vs_inductor: float = float("nan")   # inductor median / this median (> 1: faster)
    gflops: float = float("nan")              # whole-model FLOPs of one forward (FlopCounterMode)
    flops_note: str = ""
    peak_mib: float = float("nan")            # peak bytes allocated during one forward (profiler)
    compile_s: float = float("nan")           # first call (Dynamo + pass + inductor), or build time
    pass_s: float = float("nan")              # gridattn pass alone (apply_pass), summed over graphs
    kernels: Optional[int] = None             # inductor-generated (cpp_fused_*) kernel calls per forward
    layout_kernels: Optional[int] = None      # of which only move data (no arithmetic)
    extern_calls: Optional[int] = None        # extern kernel calls (GEMMs, convs, SDPA, ...)
    extra_copy_kernels: Optional[int] = None  # layout-only kernels beyond the inductor baseline's
    extra_kernel_names: str = ""
    rewritten: str = ""                       # "n/m" attention sites rewritten (gridattn configs)
    max_abs_diff: float = float("nan")        # vs the reference config (see the case)
    rel_diff: float = float("nan")            # ||out - reference|| / ||reference|| (L2, whole output)
    attn_gflops: float = float("nan")         # FLOPs of the SDPA calls alone
    sdpa: str = ""                            # SDPA kernels one call ran ("flashx12"; benchmarks/target.py)
    device: str = "cpu, float32"              # what produced the row (benchmarks/target.py)
    load_avg: float = float("nan")            # 1-minute load average before the timed runs
    foreign_cpu: float = float("nan")         # share of the CPUs other processes used during the timed runs
    times_ms: list = field(default_factory=list)

    def csv_dict(self) -> dict:
        d = asdict(self)
        d["times_ms"] = " ".join(f"{t:.3f}" for t in self.times_ms)
        return d


# ------------------------------------------------------------------------------------------------
# timing


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on Linux
        return float("nan")


class ForeignCpu:
    """CPU time used by *other* processes while active, as a share of the machine (0..1): total
    busy time from /proc/stat minus this process's own user+system time. The load average cannot
    tell this apart: a benchmark running 2 threads on 2 cores shows a load of ~2 by itself."""

    def __enter__(self):
        self._start = self._sample()
        return self

    def __exit__(self, *exc):
        end = self._sample()
        wall = end[0] - self._start[0]
        busy = end[1] - self._start[1]
        mine = end[2] - self._start[2]
        self.share = max(0.0, busy - mine) / (wall * (os.cpu_count() or 1)) if wall > 0 else float("nan")
        return False

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
            # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
            busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            busy = float("nan")
        t = os.times()
        return time.monotonic(), busy, t.user + t.system


def interleaved(fns: dict[str, Callable[[], Any]], runs: int, warmup: int, target=None) -> dict[str, list[float]]:
    """Warm every callable ``warmup`` times, then time them A B C A B C ... ``runs`` rounds (ms), with
    ``target``'s clock (benchmarks/target.py: CUDA events on a GPU; default the CPU's wall clock)."""
    from gridattn_fx.tools.target import Target

    target = target or Target()
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        target.synchronize()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(runs):
            for name, fn in fns.items():
                times[name].append(target.time_ms(fn))
    return times


@contextlib.contextmanager
def pass_timer(reports: Optional[list] = None):
    """Accumulate the wall time of the gridattn pass (``dynamo_backend.apply_pass``) while active.

    Yields a list whose single element is the seconds spent so far; the pass's reports (one per
    graph) are appended to ``reports``."""
    import gridattn_fx.frontends.backend as backend_module

    spent = [0.0]
    original = getattr(backend_module, "apply_pass", None)
    if original is None:
        yield [float("nan")]
        return

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            result = original(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t0
        if reports is not None:
            reports.append(result[1])
        return result

    with mock.patch.object(backend_module, "apply_pass", timed):
        yield spent


@contextlib.contextmanager
def capture_inductor_code():
    """Collect the output code of every graph inductor compiles while active (like
    ``torch._inductor.utils.run_and_get_code``, without its ``torch._dynamo.reset()``, so other
    compiled configurations stay compiled)."""
    from torch._inductor.graph import GraphLowering

    codes: list[str] = []
    with mock.patch.object(GraphLowering, "save_output_code", lambda code: codes.append(code)):
        yield codes


# ------------------------------------------------------------------------------------------------
# generated code


# ATen ops that only move data (or that a kernel names because it prepares their input layout:
# the consumer of a copy, e.g. the SDPA / GEMM / convolution it feeds).
_LAYOUT_OPS = sorted({
    "_scaled_dot_product_flash_attention_for_cpu", "_unsafe_view", "view", "clone", "permute", "transpose",
    "unbind", "expand", "slice", "select", "cat", "constant_pad_nd", "squeeze", "unsqueeze", "alias", "copy",
    "split", "split_with_sizes", "as_strided", "diagonal", "narrow", "unflatten", "flatten", "reshape",
    "convolution", "mm", "addmm", "bmm", "baddbmm", "stack", "t", "index", "_to_copy", "repeat",
}, key=len, reverse=True)
# Generated kernels: C++ on the CPU (``cpp_fused_<ops>_<n>(...)``), Triton on a GPU
# (``triton_poi_fused_<ops>_<n>.run(...)``; poi/per/red/tem: pointwise, persistent or plain reduction,
# template).
_KERNEL_PREFIX = re.compile(r"^(?:cpp|triton_(?:poi|per|red|tem))_fused_")
_KERNEL_DEF = re.compile(r"^((?:cpp|triton_(?:poi|per|red|tem))_fused_\w+?)(?:_\d+)? = async_compile\.(?:cpp|triton)",
                         re.M)
_CALL = re.compile(r"^\s+((?:cpp|triton_(?:poi|per|red|tem))_fused_\w+?)(?:\.run)?\(", re.M)
_CALL_DEF = re.compile(r"^\s*def call\((?:self, )?args\):", re.M)
_KERNEL_SUFFIX = re.compile(r"_\d+$")
_EXTERN = re.compile(r"(extern_kernels\.\w+|torch\.ops\.\w+\.\w+(?:\.\w+)?)\(")


def is_layout_only(kernel_name: str) -> bool:
    """Whether an inductor kernel's name (``cpp_fused_<aten ops>``, ``triton_poi_fused_<aten ops>``)
    lists only data-movement ops."""
    rest = _KERNEL_PREFIX.sub("", kernel_name)
    rest = "_" + rest + "_"
    for op in _LAYOUT_OPS:
        while "_" + op + "_" in rest:
            rest = rest.replace("_" + op + "_", "__")
    return rest.strip("_") == ""


@dataclass
class CodeStats:
    kernels: list[str]
    layout_kernels: list[str]
    extern_calls: list[str]


def code_stats(codes: list[str]) -> CodeStats:
    """Kernel *calls* per forward in inductor's output code (a kernel defined once and called for
    every block counts once per call)."""
    kernels, externs = [], []
    for code in codes:
        call = _CALL_DEF.split(code, 1)
        body = call[1].split("\nrunner = ", 1)[0] if len(call) == 2 else ""
        defined = set(_KERNEL_DEF.findall(code)) | set(
            re.findall(r"^((?:cpp|triton_(?:poi|per|red|tem))_fused_\w+) = async_compile", code, re.M))
        for m in _CALL.finditer(body):
            name = m.group(1)
            if name in defined:
                kernels.append(_KERNEL_SUFFIX.sub("", name))
        externs += [m for m in _EXTERN.findall(body) if "assert" not in m]
    return CodeStats(kernels, [k for k in kernels if is_layout_only(k)], externs)


def extra_layout_kernels(candidate: CodeStats, baseline: CodeStats) -> list[str]:
    """Layout-only kernels of ``candidate`` beyond the baseline's (a multiset difference by count)."""
    n_extra = len(candidate.layout_kernels) - len(baseline.layout_kernels)
    if n_extra <= 0:
        return []
    base = list(baseline.layout_kernels)
    extra = []
    for k in candidate.layout_kernels:
        if k in base:
            base.remove(k)
        else:
            extra.append(k)
    return extra[:n_extra] if len(extra) >= n_extra else extra


# ------------------------------------------------------------------------------------------------
# output


def first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "values"):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for o in out:
            t = first_tensor(o)
            if t is not None:
                return t
    return None


def _paired(a, b):
    """The first tensors of two outputs in float64, or None when they cannot be compared."""
    ta, tb = first_tensor(a), first_tensor(b)
    return None if ta is None or tb is None or ta.shape != tb.shape else (ta.double(), tb.double())


def max_abs_diff(a, b) -> float:
    pair = _paired(a, b)
    return float("nan") if pair is None else float((pair[0] - pair[1]).abs().max())


def rel_diff(a, b) -> float:
    pair = _paired(a, b)
    return float("nan") if pair is None else float((pair[0] - pair[1]).norm() / pair[1].norm())


def fmt(x, spec=".1f", na="-") -> str:
    if x is None:
        return na
    if isinstance(x, float) and x != x:
        return na
    return format(x, spec)


def table(rows: list[Row]) -> str:
    head = ("case", "size", "config", "median ms", "min ms", "vs inductor", "GFLOP", "peak MiB",
            "compile s", "pass s", "kernels", "copy k.", "extra copy", "sites", "max|diff|", "sdpa", "load",
            "other CPU")
    lines = [head]
    for r in rows:
        lines.append((
            r.case, r.size, r.config, fmt(r.median_ms), fmt(r.min_ms),
            fmt(r.ratio_vs_inductor, ".2f") + ("x" if r.ratio_vs_inductor == r.ratio_vs_inductor else ""),
            fmt(r.gflops, ".2f") + ("*" if r.flops_note else ""), fmt(r.peak_mib), fmt(r.compile_s),
            fmt(r.pass_s, ".2f"), fmt(r.kernels, "d"), fmt(r.layout_kernels, "d"), fmt(r.extra_copy_kernels, "d"),
            r.rewritten or "-", fmt(r.max_abs_diff, ".2g"), r.sdpa or "-", fmt(r.load_avg, ".2f"),
            fmt(100 * r.foreign_cpu, ".0f") + "%",
        ))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = []
    for j, line in enumerate(lines):
        cells = [str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        out.append("  ".join(cells).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown_table(rows: list[Row]) -> str:
    head = ["case", "size", "config", "median ms", "vs inductor", "GFLOP", "peak MiB", "compile s",
            "pass s", "kernels", "copy kernels", "extra copy", "sites rewritten", "sdpa kernels", "load before",
            "other CPU"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        out.append("| " + " | ".join([
            r.case, r.size, r.config, fmt(r.median_ms), fmt(r.ratio_vs_inductor, ".2f"),
            fmt(r.gflops, ".2f") + ("*" if r.flops_note else ""), fmt(r.peak_mib), fmt(r.compile_s),
            fmt(r.pass_s, ".2f"), fmt(r.kernels, "d"), fmt(r.layout_kernels, "d"), fmt(r.extra_copy_kernels, "d"),
            r.rewritten or "-", r.sdpa or "-", fmt(r.load_avg, ".2f"), fmt(100 * r.foreign_cpu, ".0f") + "%",
        ]) + " |")
    return "\n".join(out)


def write_csv(rows: list[Row], path: str) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].csv_dict()))
        writer.writeheader()
        for r in rows:
            writer.writerow(r.csv_dict())


def plots(rows: list[Row], outdir: str) -> list[str]:
    """Latency and FLOPs per configuration (one figure per case and size), latency vs resolution
    for the attention core. Returns the files written ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.case, r.size), []).append(r)
    for (case, size), rs in groups.items():
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 0.45 * len(rs) + 1.8))
        names = [r.config for r in rs][::-1]
        ax1.barh(names, [r.median_ms for r in rs][::-1], color="tab:blue")
        ax1.set_xlabel("median latency (ms), lower is better")
        for i, r in enumerate(rs[::-1]):
            if r.ratio_vs_inductor == r.ratio_vs_inductor:
                ax1.text(r.median_ms, i, f" {r.ratio_vs_inductor:.2f}x", va="center", fontsize=8)
        ax2.barh(names, [r.gflops for r in rs][::-1], color="tab:orange")
        ax2.set_xlabel("whole-model GFLOP per forward")
        ax2.set_yticklabels([])
        fig.suptitle(f"{case} {size}: latency and FLOPs per configuration (CPU)")
        fig.tight_layout()
        path = os.path.join(outdir, f"{_slug(case)}_{_slug(size)}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    for case in sorted({r.case for r in rows}):
        sizes = sorted({r.size for r in rows if r.case == case}, key=_size_key)
        if len(sizes) < 2:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for config in dict.fromkeys(r.config for r in rows if r.case == case):
            pts = [(s, r.median_ms) for s in sizes for r in rows
                   if r.case == case and r.size == s and r.config == config]
            if len(pts) >= 2:
                ax.plot([_size_key(s) for s, _ in pts], [m for _, m in pts], marker="o", label=config)
        ax.set_xlabel("image tokens per side")
        ax.set_ylabel("median latency (ms)")
        ax.set_yscale("log")
        ax.set_xticks([_size_key(s) for s in sizes])
        ax.set_title(f"{case}: latency vs resolution (CPU)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(outdir, f"{_slug(case)}_latency_vs_resolution.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _size_key(size: str) -> int:
    m = re.match(r"(\d+)", size)
    return int(m.group(1)) if m else 0


def median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")
