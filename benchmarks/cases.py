"""Benchmark cases and their configurations, run side by side in one process.

Case 1 ``attn-core`` / ``attn-block``: one image self-attention at 32x32, 64x64, 96x96 tokens, head
dim 64 (see :mod:`benchmarks.models`); case 2 ``sam``: official SAM ViT-B image encoder at 1024x1024;
case 3 ``sd-unet``: SD-2.1 UNet2DConditionModel at 768x768 (96x96 latents), one denoising step;
case 4 ``segformer``: SegFormer with MiT-B1 widths at 1024x1024; case 5 (compile time) is measured
on every compiled configuration of every case; case 7 ``heads`` (``--cases heads``): per-head
groupings and shared pooled tokens against uniform grid grouping at the same stride.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from . import common
from .common import Row
from gridattn_fx.tools.target import Target, sdpa_kernels

CPU = Target()

log = logging.getLogger("benchmarks")

# ------------------------------------------------------------------------------------------------
# gridattn options (presets where the installed gridattn_fx has them)

# What each preset means, spelled out, for a gridattn_fx without presets.
EXPLICIT = {
    "sam": {"min_image_tokens": 1024},  # global blocks: the windowed ones have no proven layout
    "sd-unet": {"min_image_tokens": 0, "include": [r"^(down_blocks|mid_block)\..*attn1$"]},
    "segformer": {"min_image_tokens": 0},
    None: {"min_image_tokens": 0},
}


def grid_options(preset: Optional[str], stride: int, **extra) -> dict:
    """``{"preset": preset, "stride": stride}`` when the installed gridattn_fx knows the preset,
    else the preset's meaning as explicit options."""
    from gridattn_fx import GridAttnConfig

    if preset is not None:
        options = {"preset": preset, "stride": stride, **extra}
        try:
            GridAttnConfig.from_options(options)
            return options
        except (ValueError, TypeError):
            pass
    return {**EXPLICIT[preset], "stride": stride, **extra}


# ------------------------------------------------------------------------------------------------
# configurations


@dataclass
class Config:
    name: str
    kind: str                        # eager | inductor | gridattn | flex | eager-grid
    module: Any                      # the nn.Module to run (compiled for inductor/gridattn/flex)
    options: Optional[dict] = None   # gridattn options
    reference: Optional[str] = None  # config whose output this one must match (max |diff|)
    flops: Optional[Callable[[], tuple[float, str]]] = None  # (GFLOP, note) override
    fn: Optional[Callable[[], Any]] = None
    dynamic: bool = False            # compile with dynamic=True (symbolic sizes) instead of False


def _compile(cfg: Config):
    if cfg.kind == "inductor" or cfg.kind == "flex":
        return torch.compile(cfg.module, backend="inductor", dynamic=cfg.dynamic)
    if cfg.kind == "gridattn":
        return torch.compile(cfg.module, backend="gridattn", options=cfg.options, dynamic=cfg.dynamic)
    return cfg.module


def run_case(case: str, size: str, configs: list[Config], inputs: tuple, *, runs: int, warmup: int,  # noqa: C901 - one interleaved timing loop, its branches are the table's columns
             echo: Callable[[str], None] = print, memory: bool = True, target: Target = CPU) -> list[Row]:
    """Place modules and inputs on ``target``; compile (timed), check outputs, time interleaved,
    then measure memory, the SDPA kernels each configuration ran, and FLOPs."""
    from gridattn_fx.tools.flops import count_flops_by_kind

    torch._dynamo.reset()
    for cfg in configs:
        cfg.module = target.place(cfg.module)
    inputs = target.place_inputs(inputs)
    rows = {c.name: Row(case, size, c.name, device=target.describe()) for c in configs}
    stats: dict[str, common.CodeStats] = {}
    outputs: dict[str, Any] = {}
    with torch.no_grad():
        for cfg in configs:
            compiled = _compile(cfg)
            cfg.fn = (lambda m=compiled: m(*inputs))
            row = rows[cfg.name]
            reports: list = []
            with common.pass_timer(reports) as spent, common.capture_inductor_code() as codes:
                t0 = time.perf_counter()
                outputs[cfg.name] = cfg.fn()
                first = time.perf_counter() - t0
            if cfg.kind in ("inductor", "gridattn", "flex"):
                row.compile_s = first
                st = stats[cfg.name] = common.code_stats(codes)
                row.kernels, row.layout_kernels, row.extern_calls = (
                    len(st.kernels), len(st.layout_kernels), len(st.extern_calls))
            if cfg.kind == "gridattn":
                row.pass_s = spent[0]
                sites = sum(len(r.sites) for r in reports)
                rewritten = sum(len(r.rewritten) for r in reports)
                row.rewritten = f"{rewritten}/{sites}"
                failures = [r.failure for r in reports if r.failure]
                if failures:
                    echo(f"  WARNING {cfg.name}: gridattn pass failed: {failures[0]}")
            echo(f"  {case} {size} {cfg.name}: first call {first:.1f} s"
                 + (f" (pass {row.pass_s:.2f} s, {row.rewritten} sites rewritten)" if cfg.kind == "gridattn" else ""))
        base = stats.get("inductor")
        if base is not None:
            for name, st in stats.items():
                if name != "inductor":
                    extra = common.extra_layout_kernels(st, base)
                    rows[name].extra_copy_kernels = len(st.layout_kernels) - len(base.layout_kernels)
                    rows[name].extra_kernel_names = " ".join(extra)
            rows["inductor"].extra_copy_kernels = 0
        for cfg in configs:
            ref = cfg.reference or "eager"
            if ref in outputs and ref != cfg.name:
                rows[cfg.name].max_abs_diff = common.max_abs_diff(outputs[cfg.name], outputs[ref])
                rows[cfg.name].rel_diff = common.rel_diff(outputs[cfg.name], outputs[ref])
        outputs.clear()

        load = common.load_average()
        echo(f"  timing {len(configs)} configurations interleaved: {warmup} warm-up + {runs} runs each "
             f"(load average {load:.2f})")
        with common.ForeignCpu() as foreign:
            times = common.interleaved({c.name: c.fn for c in configs}, runs=runs, warmup=warmup, target=target)
        echo(f"  done: other processes used {100 * foreign.share:.0f}% of the CPUs meanwhile"
             + ("  (CONTENDED: rerun this case)" if foreign.share > 0.05 else ""))
        for name, ts in times.items():
            row = rows[name]
            row.times_ms, row.runs = ts, len(ts)
            row.median_ms, row.min_ms, row.max_ms = common.median(ts), min(ts), max(ts)
            row.load_avg, row.foreign_cpu = load, foreign.share
        if "inductor" in rows:
            base_ms = rows["inductor"].median_ms
            for row in rows.values():
                row.ratio_vs_inductor = base_ms / row.median_ms

        if memory:
            for cfg in configs:
                rows[cfg.name].peak_mib = target.peak_bytes(cfg.fn) / 2**20
        for cfg in configs:
            rows[cfg.name].sdpa = sdpa_kernels(cfg.fn)
            if target.cuda and cfg.kind == "gridattn" and "math" in rows[cfg.name].sdpa:
                echo(f"  WARNING {cfg.name}: grouped attention fell back to SDPA's math kernel "
                     f"({rows[cfg.name].sdpa})")

    # FLOPs: the eager model for eager/inductor, the rewritten graph (gridattn_fx.rewrite) for gridattn.
    flops_cache: dict = {}
    for cfg in configs:
        row = rows[cfg.name]
        if cfg.flops is not None:
            row.gflops, row.flops_note = cfg.flops()
            continue
        if cfg.kind == "gridattn":
            import gridattn_fx

            key = ("grid", repr(sorted(cfg.options.items())))
            if key not in flops_cache:
                gm, _ = gridattn_fx.rewrite(cfg.module, inputs, **_rewrite_options(cfg.options))
                flops_cache[key] = tuple(n / 1e9 for n in count_flops_by_kind(gm, inputs))
        else:
            key = ("module", id(cfg.module))
            if key not in flops_cache:
                flops_cache[key] = tuple(n / 1e9 for n in count_flops_by_kind(cfg.module, inputs))
        row.gflops, row.attn_gflops = flops_cache[key]
    for cfg in configs:
        cfg.fn = None
    torch._dynamo.reset()
    return [rows[c.name] for c in configs]


def _rewrite_options(options: dict) -> dict:
    """Backend options as ``rewrite()`` keywords (a preset through ``config=``)."""
    from gridattn_fx import GridAttnConfig

    config, _ = GridAttnConfig.from_options(options)
    return {"config": config}


# ------------------------------------------------------------------------------------------------
# case 1: attention core and block


def attention_cases(sizes, *, runs, warmup, heads=2, head_dim=64, echo=print, memory=True,
                    target: Target = CPU) -> list[Row]:
    from .models import AttentionBlock, AttentionCore, EagerGridBlock, EagerGridCore, FlexGridCore

    rows: list[Row] = []
    for n in sizes:
        torch.manual_seed(0)
        core = AttentionCore(heads, head_dim).eval()
        # token-major memory (channels last), as a 1x1 conv / linear producing q, k, v writes it
        x = torch.randn(1, core.channels(), n, n).contiguous(memory_format=torch.channels_last)
        size = f"{n}x{n}"
        configs = [
            Config("eager", "eager", core),
            Config("inductor", "inductor", core),
        ]
        for g in (2, 4):
            configs.append(Config(f"gridattn s{g}", "gridattn", core, grid_options(None, g), reference=f"eager-grid s{g}"))
        configs.append(Config("gridattn s2 at-site", "gridattn", core, grid_options(None, 2, move_regrouping=False),
                              reference="eager-grid s2"))
        for g in (2, 4):
            configs.append(Config(f"eager-grid s{g}", "eager-grid", EagerGridCore(heads, head_dim, g).eval(),
                                  reference=f"eager-grid s{g}"))
        for g in (2, 4):
            flex = FlexGridCore(n, n, heads, head_dim, g, clustered=True).eval()
            configs.append(Config(f"flex s{g}", "flex", flex, reference=f"eager-grid s{g}",
                                  flops=_flex_flops(flex, n, heads, head_dim)))
        raster = FlexGridCore(n, n, heads, head_dim, 2, clustered=False).eval()
        configs.append(Config("flex-raster s2", "flex", raster, reference="eager-grid s2",
                              flops=_flex_flops(raster, n, heads, head_dim)))
        echo(f"[attn-core {size}] heads {heads} x d {head_dim}, {n * n} tokens")
        rows += run_case("attn-core", size, configs, (x,), runs=runs, warmup=warmup, echo=echo, memory=memory,
                         target=target)

        torch.manual_seed(0)
        block = AttentionBlock(heads, head_dim).eval()
        x = torch.randn(1, block.channels(), n, n)
        configs = [Config("eager", "eager", block), Config("inductor", "inductor", block)]
        for g in (2, 4):
            grid_block = EagerGridBlock(heads, head_dim, g).eval()
            grid_block.load_state_dict(block.state_dict())
            configs.append(Config(f"gridattn s{g}", "gridattn", block, grid_options(None, g),
                                  reference=f"eager-grid s{g}"))
            configs.append(Config(f"eager-grid s{g}", "eager-grid", grid_block, reference=f"eager-grid s{g}"))
        configs.append(Config("gridattn s2 at-site", "gridattn", block, grid_options(None, 2, move_regrouping=False),
                              reference="eager-grid s2"))
        echo(f"[attn-block {size}] width {heads * head_dim}, {n * n} tokens")
        rows += run_case("attn-block", size, configs, (x,), runs=runs, warmup=warmup, echo=echo, memory=memory,
                         target=target)
    return rows


def heads_cases(sizes, *, runs, warmup, heads=4, head_dim=32, echo=print, memory=True,
                target: Target = CPU) -> list[Row]:
    """Case 7 ``heads``: one attention block at stride 2 with every head on the grid, in windows,
    half and half (per-head groupings), and on the grid with shared pooled tokens; the same
    attention FLOPs but for the pooled tokens. Each is checked against its masked form."""
    from .models import AttentionBlock

    rows: list[Row] = []
    variants = {"grid": {}, "window": {"grouping": "window"}, "mixed": {"grouping": ("grid", "window")},
                "grid+pool4": {"shared_pool": 4}}
    for n in sizes:
        torch.manual_seed(0)
        block = AttentionBlock(heads, head_dim).eval()
        x = torch.randn(1, block.channels(), n, n)
        configs = [Config("inductor", "inductor", block)]
        for name, extra in variants.items():
            configs.append(Config(f"gridattn s2 {name}", "gridattn", block, grid_options(None, 2, **extra),
                                  reference=f"masked s2 {name}" if name in ("mixed", "grid+pool4") else None))
        # Dynamo compiles one code object at most 8 times (its recompile limit), so only the new
        # forms get a masked reference here; grid and window are checked against theirs in "attn".
        for name in ("mixed", "grid+pool4"):
            configs.append(Config(f"masked s2 {name}", "gridattn", block,
                                  grid_options(None, 2, implementation="masked", **variants[name]),
                                  reference=f"masked s2 {name}"))
        echo(f"[attn-heads {n}x{n}] {heads} heads x d {head_dim}, {n * n} tokens")
        rows += run_case("attn-heads", f"{n}x{n}", configs, (x,), runs=runs, warmup=warmup, echo=echo,
                         memory=memory, target=target)
    return rows


def dynamic_cases(sizes, *, runs, warmup, heads=2, head_dim=64, echo=print, memory=True,
                  target: Target = CPU) -> list[Row]:
    """Case 6: the symbolic-size rewrite against the static one at one resolution: the attention
    block compiled with dynamic=True vs dynamic=False (gridattn stride 2; inductor both ways for
    reference). The static rewrite moves its regrouping across the projections; the symbolic one
    keeps it at the attention call (passes/motion.py), so the static at-site form is timed too."""
    from .models import AttentionBlock

    rows: list[Row] = []
    for n in sizes:
        torch.manual_seed(0)
        block = AttentionBlock(heads, head_dim).eval()
        x = torch.randn(1, block.channels(), n, n)
        configs = [
            Config("eager", "eager", block),
            Config("inductor", "inductor", block),
            Config("inductor dynamic", "inductor", block, dynamic=True, reference="inductor"),
            Config("gridattn s2", "gridattn", block, grid_options(None, 2)),
            Config("gridattn s2 at-site", "gridattn", block, grid_options(None, 2, move_regrouping=False),
                   reference="gridattn s2"),
            Config("gridattn s2 dynamic", "gridattn", block, grid_options(None, 2), dynamic=True,
                   reference="gridattn s2"),
        ]
        echo(f"[dynamic {n}x{n}] width {heads * head_dim}, {n * n} tokens: dynamic=True vs dynamic=False")
        case_rows = run_case("dynamic", f"{n}x{n}", configs, (x,), runs=runs, warmup=warmup, echo=echo,
                             memory=memory, target=target)
        by = {r.config: r for r in case_rows}
        for static, dynamic in (("gridattn s2", "gridattn s2 dynamic"), ("gridattn s2 at-site", "gridattn s2 dynamic"),
                                ("inductor", "inductor dynamic")):
            echo(f"  {dynamic} / {static}: {by[dynamic].median_ms / by[static].median_ms:.3f} (median latency ratio)")
        rows += case_rows
    return rows


def _flex_flops(flex, n, heads, head_dim):
    def f():
        dense = 2 * heads * (n * n) ** 2 * 2 * head_dim
        return dense * flex.attention_density() / 1e9, "block-mask density"
    return f


# ------------------------------------------------------------------------------------------------
# cases 2-4: real models


def model_case(case: str, name: str, preset: str, build_kwargs: dict, size: str, *, runs, warmup, echo=print,
               memory=True, extra_options: Optional[dict] = None, extra_configs: Optional[dict] = None,
               target: Target = CPU) -> list[Row]:
    """eager, inductor, gridattn stride 2 and 4 with ``preset`` (+ ``extra_options``), and any
    ``extra_configs`` ({name: gridattn options}) for information."""
    from gridattn_fx import zoo

    t0 = time.perf_counter()
    model, inputs = zoo.build(name, **build_kwargs)
    echo(f"[{case} {size}] {name} {build_kwargs} built in {time.perf_counter() - t0:.1f} s")
    configs = [Config("eager", "eager", model), Config("inductor", "inductor", model)]
    for g in (2, 4):
        configs.append(Config(f"gridattn s{g}", "gridattn", model, grid_options(preset, g, **(extra_options or {}))))
    for extra_name, options in (extra_configs or {}).items():
        configs.append(Config(extra_name, "gridattn", model, options))
    rows = run_case(case, size, configs, tuple(inputs), runs=runs, warmup=warmup, echo=echo, memory=memory,
                    target=target)
    del model, inputs
    return rows


# MiT-B1 (nvidia/mit-b1): widths 64/128/320/512, 2 blocks per stage, heads 1/2/5/8, reduction 8/4/2/1.
SEGFORMER_B1 = dict(hidden_sizes=[64, 128, 320, 512], depths=[2, 2, 2, 2], num_attention_heads=[1, 2, 5, 8],
                    sr_ratios=[8, 4, 2, 1], decoder_hidden_size=256, num_labels=150, image_size=1024)


def model_cases(which, *, quick, runs, warmup, echo=print, memory=True, target: Target = CPU) -> list[Row]:
    rows: list[Row] = []
    small = {"min_image_tokens": 0} if quick else {}
    if "sam" in which:
        rows += model_case("sam", "sam:vit_b", "sam", {"small": quick}, "256px" if quick else "1024px",
                           runs=runs, warmup=warmup, echo=echo, memory=memory, extra_options=small, target=target)
    if "sd-unet" in which:
        # For information (not the preset): the regrouping kept at the attention call, and every
        # image self-attention, the up blocks included.
        extra = {"gridattn s2 at-site": grid_options("sd-unet", 2, move_regrouping=False),
                 "gridattn s2 all-self": {"stride": 2, "min_image_tokens": 0}}
        rows += model_case("sd-unet", "diffusers:unet-sd21", "sd-unet", {"small": quick},
                           "32x32 latents" if quick else "96x96 latents", runs=runs, warmup=warmup, echo=echo,
                           memory=memory, extra_configs=None if quick else extra, target=target)
    if "segformer" in which:
        kwargs = {"small": True} if quick else {"small": False, **SEGFORMER_B1}
        extra = {"gridattn s2 at-site": grid_options("segformer", 2, move_regrouping=False)}
        rows += model_case("segformer", "transformers:segformer", "segformer", kwargs,
                           "128px" if quick else "1024px", runs=runs, warmup=warmup, echo=echo, memory=memory,
                           extra_configs=None if quick else extra, target=target)
    return rows
