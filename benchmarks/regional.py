"""Regional vs whole-model compilation, gridattn vs inductor, side by side in one process.

    python -m benchmarks --cases regional [--quick]
    python -m benchmarks.regional [--quick] [--runs 5]

For the SD-2.1 UNet (``compile_repeated_blocks``: its BasicTransformerBlocks) and a Flux-like
transformer (diffusers' FluxTransformer2DModel: its double and single blocks, tokens declared with
``ImageTokens.from_position_ids("img_ids")``), four configurations on separate copies of the model:

- ``inductor whole``: ``torch.compile(model)``;
- ``inductor regional``: ``model.compile_repeated_blocks()``;
- ``gridattn s2 whole``: ``torch.compile(model, backend="gridattn")`` (the Flux model is prepared
  too: its tokens can only be declared);
- ``gridattn s2 regional``: ``gridattn_fx.prepare(...)`` then
  ``model.compile_repeated_blocks(backend="gridattn")``.

Every gridattn configuration rewrites every image self-attention (stride 2, min_image_tokens 0; the
sd-unet preset selects sites by absolute module path, which a block's own graph does not see).
``compile_s`` is the first call (Dynamo + pass + inductor), prepare() included where it is used;
latency is the median of interleaved runs; ``max_abs_diff`` is against ``inductor whole`` for the
inductor rows and against ``gridattn s2 whole`` for ``gridattn s2 regional``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from benchmarks import common
from benchmarks.common import Row
from gridattn_fx.tools.target import Target

OPTIONS = {"stride": 2, "min_image_tokens": 0}


def _models(quick: bool):
    from gridattn_fx import ImageTokens, zoo

    unet, unet_inputs = zoo.build("diffusers:unet-sd21", small=True, **({} if quick else {"sample_size": 64}))
    grid = (16, 16) if quick else (32, 32)
    flux, flux_inputs = zoo.build("diffusers:flux", small=True, grid=grid,
                                  **({} if quick else {"num_layers": 2, "num_single_layers": 4}))
    unet_size = f"{unet_inputs[0].shape[-2]}x{unet_inputs[0].shape[-1]} latents"
    return [
        ("regional sd-unet", unet_size, unet, tuple(unet_inputs), {}),
        ("regional flux", f"{grid[0]}x{grid[1]} tokens", flux, tuple(flux_inputs),
         {"hidden_states": ImageTokens.from_position_ids("img_ids")}),
    ]


def _configure(name: str, model, inputs, declarations):
    """(callable, prepare seconds) for one configuration on its own copy of the model."""
    import gridattn_fx

    model = copy.deepcopy(model)
    prepare_s = 0.0
    gridattn = name.startswith("gridattn")
    if gridattn and (name.endswith("regional") or declarations):
        t0 = time.perf_counter()
        gridattn_fx.prepare(model, inputs, **declarations)
        prepare_s = time.perf_counter() - t0
    backend = dict(backend="gridattn", options=OPTIONS) if gridattn else dict(backend="inductor")
    if name.endswith("regional"):
        model.compile_repeated_blocks(**backend)
        fn = model
    else:
        fn = torch.compile(model, **backend)
    return (lambda: fn(*inputs)), prepare_s


def regional_cases(*, quick: bool, runs: int, warmup: int, echo=print, target: Target = Target()) -> list[Row]:
    import gridattn_fx

    rows: list[Row] = []
    names = ["inductor whole", "inductor regional", "gridattn s2 whole", "gridattn s2 regional"]
    for case, size, model, inputs, declarations in _models(quick):
        model, inputs = target.place(model), target.place_inputs(inputs)
        fns, outs = {}, {}
        by_name: dict[str, Row] = {}
        for name in names:
            torch._dynamo.reset()
            gridattn_fx.report_history(clear=True)
            fn, prepare_s = _configure(name, model, inputs, declarations)
            t0 = time.perf_counter()
            with torch.no_grad():
                outs[name] = common.first_tensor(fn())
            row = Row(case, size, name, compile_s=time.perf_counter() - t0 + prepare_s, device=target.describe())
            if name.startswith("gridattn"):
                sites = [s for r in gridattn_fx.report_history(clear=True) for s in r.sites]
                done = sum(s.decision == "rewritten" for s in sites)
                row.rewritten = f"{done}/{len(sites)} graph sites"
            echo(f"[{case} {size}] {name}: first call {row.compile_s:.1f} s"
                 + (f" (prepare {prepare_s:.1f} s)" if prepare_s else "") + (f", {row.rewritten}" if row.rewritten else ""))
            fns[name], by_name[name] = fn, row
        # Compiled functions keep their own caches; Dynamo's recompile limit is not reached here.
        times = common.interleaved(fns, runs=runs, warmup=warmup, target=target)
        base = common.median(times["inductor whole"])
        for name in names:
            row = by_name[name]
            row.times_ms = times[name]
            row.runs = len(times[name])
            row.median_ms, row.min_ms, row.max_ms = common.median(times[name]), min(times[name]), max(times[name])
            row.ratio_vs_inductor = base / row.median_ms
            reference = "gridattn s2 whole" if name == "gridattn s2 regional" else "inductor whole"
            row.max_abs_diff = common.max_abs_diff(outs[name], outs[reference])
            rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.regional", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args(argv)
    rows = regional_cases(quick=args.quick, runs=args.runs, warmup=args.warmup)
    print()
    print(common.table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
