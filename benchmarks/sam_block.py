"""One SAM ViT-B global-attention block (64x64 tokens, decomposed rel-pos bias), compiled with inductor
and with gridattn (stride 2, 4): latency, the most expensive kernels (inductor kernel profiling on),
and the minor page faults of one forward (memory first-touched by the call).

    python -m benchmarks.sam_block [--strides 2,4] [--runs 5]

Evidence for the SAM notes in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strides", default="2,4")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args(argv)

    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.relpos_bias_cost import SamGlobalAttention

    inductor_config.cpp.enable_kernel_profile = True
    torch.manual_seed(0)
    model = SamGlobalAttention(args.tokens).eval()
    x = torch.randn(1, 3, 16 * args.tokens, 16 * args.tokens)
    fns = {"inductor": torch.compile(model, dynamic=False)}
    for s in (int(v) for v in args.strides.split(",")):
        fns[f"gridattn s{s}"] = torch.compile(model, backend="gridattn", dynamic=False,
                                              options={"stride": s, "min_image_tokens": 0})
    with torch.no_grad():
        for fn in fns.values():
            fn(x), fn(x)
        times = {name: [] for name in fns}
        for _ in range(args.runs):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(x)
                times[name].append((time.perf_counter() - t0) * 1e3)
        print(f"SAM global block, {args.tokens}x{args.tokens} tokens, torch {torch.__version__}: "
              f"median of {args.runs} interleaved runs")
        for name, fn in fns.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            fn(x)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            print(f"  {name:12s} {statistics.median(times[name]):8.1f} ms   {faults} minor page faults "
                  f"({faults * 4096 / 2**20:.0f} MiB first-touched per forward)")
        for name, fn in fns.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    fn(x)
            print(f"\n{name}: most expensive ops and kernels, ms per forward")
            for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:6]:
                print(f"  {e.self_cpu_time_total / 3e3:8.1f}  {e.key[:110]}")


if __name__ == "__main__":
    main()
