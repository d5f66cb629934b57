"""How much of a model's forward time the attention sites a preset rewrites take: the ceiling on
the latency a preset can save, whatever the rewrite costs.

    python -m benchmarks.attention_share [--model diffusers:unet-sd21] [--preset sd-unet] [--runs 2]

Profiles eager forwards (the attention kernel is the same ATen flash kernel eager and compiled),
times every SDPA call by its input shapes, and charges each site the mean time of its shape.
Prints per-shape times, the preset's share of the forward, and two ceilings on its latency
reduction: attention made free, and attention made G*G times cheaper (the grid limit).
Evidence for the SD-UNet note in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

_SDPA_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_efficient_attention",
             "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_attention_math")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="diffusers:unet-sd21")
    parser.add_argument("--preset", default="sd-unet")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="the zoo's small config (smoke test)")
    args = parser.parse_args(argv)

    import gridattn_fx
    from gridattn_fx import zoo
    from torch.profiler import profile

    torch.manual_seed(0)
    model, inputs = zoo.build(args.model, small=args.small)
    _, report = gridattn_fx.rewrite(model, inputs, preset=args.preset)
    sites = [(tuple(s.q_shape), tuple(s.k_shape), s.decision == "rewritten", s.stride) for s in report.sites]

    with torch.no_grad():
        model(*inputs)  # warm-up
        walls, per_shape = [], collections.defaultdict(list)
        for _ in range(args.runs):
            with profile(record_shapes=True) as prof:
                t0 = time.perf_counter()
                model(*inputs)
                walls.append(time.perf_counter() - t0)
            for event in prof.events():
                if event.name in _SDPA_OPS and event.input_shapes:
                    q, k = tuple(event.input_shapes[0]), tuple(event.input_shapes[1])
                    per_shape[(q[-2:], k[-2])].append(event.cpu_time_total / 1e3)
    wall_ms = statistics.median(walls) * 1e3

    print(f"{args.model}, preset {args.preset!r}: {len(sites)} attention sites, "
          f"{sum(r for *_, r, _ in sites)} rewritten by the preset; eager forward {wall_ms:.0f} ms "
          f"(median of {args.runs}, profiled); torch {torch.__version__}")
    print(f"{'q (L, d)':>14} {'Lk':>6} {'sites':>5} {'preset':>6} {'ms per call':>11}")
    mean = {key: statistics.mean(v) for key, v in per_shape.items()}
    total_attn = preset_attn = limit_saved = 0.0
    counts = collections.Counter((q[-2:], k[-2], r) for q, k, r, _ in sites)
    for (shape, lk, rewritten), n in sorted(counts.items(), key=lambda kv: -kv[0][0][0]):
        ms = mean.get((shape, lk))
        if ms is None:
            continue
        print(f"{str(shape):>14} {lk:>6} {n:>5} {'yes' if rewritten else 'no':>6} {ms:>11.1f}")
        total_attn += n * ms
        if rewritten:
            preset_attn += n * ms
    for q, k, rewritten, stride in sites:
        if rewritten and (q[-2:], k[-2]) in mean:
            limit_saved += mean[(q[-2:], k[-2])] * (1 - 1 / (stride[0] * stride[1]))
    print(f"attention: {total_attn:.0f} ms = {100 * total_attn / wall_ms:.1f}% of the forward; "
          f"the preset's sites {preset_attn:.0f} ms = {100 * preset_attn / wall_ms:.1f}%")
    print(f"ceiling on the preset's latency reduction: {100 * preset_attn / wall_ms:.1f}% if its attention "
          f"were free, {100 * limit_saved / wall_ms:.1f}% at the grid limit (1/G^2 of the work)")


if __name__ == "__main__":
    main()
