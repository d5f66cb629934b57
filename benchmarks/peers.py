"""``python -m benchmarks --cases peers``: gridattn against the peer a Stable Diffusion user would pick
instead, token merging (tomesd), on the SD-2.1 UNet, all compiled by inductor, in one interleaved run.

* ``inductor``: the dense UNet, the reference every output error is measured against;
* ``tomesd r0.5``: ``tomesd.apply_patch(unet, ratio=0.5)`` (its default ratio and its default
  placement: the highest-resolution transformer blocks) on a copy of the same UNet;
* ``gridattn sd s2``: the ``sd-unet`` preset at stride 2;
* ``gridattn hi-res s2``: the self-attention of the highest-resolution blocks at stride 2, where
  tomesd merges by default (equal placement);
* ``gridattn all-self s2``: every image self-attention at stride 2.

Full size: SD-2.1's UNet at 512x512 (64x64 latents), one denoising step; ``--quick``: the small
config at 32x32 latents. The table gives the step latency, the attention FLOPs (the SDPA calls)
and the output error against the dense UNet on the same inputs: relative L2 and max abs.
"""

from __future__ import annotations

import copy
import time

from .cases import CPU, Config, grid_options, run_case


def hi_res(unet) -> dict:
    """tomesd's default placement (max_downsample=1) as gridattn options: the self-attention of the
    transformer blocks at the latents' full resolution (the first down block, the last up block)."""
    last = len(unet.up_blocks) - 1
    return {"min_image_tokens": 0, "include": [rf"^(down_blocks\.0|up_blocks\.{last})\..*attn1$"]}


def peers_cases(*, quick: bool, runs: int, warmup: int, echo=print, memory: bool = True, target=CPU):
    import tomesd

    from gridattn_fx import zoo

    t0 = time.perf_counter()
    model, inputs = zoo.build("diffusers:unet-sd21", small=quick, **({} if quick else {"sample_size": 64}))
    model.eval()
    merged = copy.deepcopy(model)
    tomesd.apply_patch(merged, ratio=0.5)
    size = f"{inputs[0].shape[-2]}x{inputs[0].shape[-1]} latents"
    echo(f"[peers {size}] diffusers:unet-sd21 {'small' if quick else 'SD-2.1'}, built in "
         f"{time.perf_counter() - t0:.1f} s")
    # tomesd compiles last: Dynamo gives up on some of its frames (graph breaks in loops) and then
    # skips those code objects in every later compile of the process, the plain UNet's included,
    # which would leave the gridattn configurations with split graphs and no proven layouts.
    configs = [
        Config("inductor", "inductor", model),
        Config("gridattn sd s2", "gridattn", model, grid_options("sd-unet", 2), reference="inductor"),
        Config("gridattn hi-res s2", "gridattn", model, {**hi_res(model), "stride": 2}, reference="inductor"),
        Config("gridattn all-self s2", "gridattn", model, {"stride": 2, "min_image_tokens": 0},
               reference="inductor"),
        Config("tomesd r0.5", "inductor", merged, reference="inductor"),
    ]
    rows = run_case("peers", size, configs, tuple(inputs), runs=runs, warmup=warmup, echo=echo, memory=memory,
                    target=target)
    echo(peers_table(rows))
    return rows


def peers_table(rows) -> str:
    base = next(r for r in rows if r.config == "inductor")
    head = ["config", "step ms", "vs dense", "attention GFLOP", "attention vs dense", "rel. L2 error",
            "max abs error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        same = r is base
        lines.append(f"| {r.config} | {r.median_ms:.1f} | {base.median_ms / r.median_ms:.2f}x | {r.attn_gflops:.2f} | "
                     f"{r.attn_gflops / base.attn_gflops:.2f} | {'-' if same else f'{r.rel_diff:.3g}'} | "
                     f"{'-' if same else f'{r.max_abs_diff:.3g}'} |")
    return f"device: {base.device}\n" + "\n".join(lines)
