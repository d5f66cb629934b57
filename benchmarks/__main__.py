"""``python -m benchmarks``: every case, every configuration side by side, in one process.

    python -m benchmarks                      # all cases at full size (tens of minutes on 2 cores)
    python -m benchmarks --quick              # small sizes, CI smoke test (< 5 minutes)
    python -m benchmarks --cases attn --sizes 64
    python -m benchmarks --quick --cases dynamic  # symbolic-size rewrite vs static (dynamic=True/False)
    python -m benchmarks --cases video        # video block 8x32x32 tokens + small Wan (benchmarks/video.py)
    python -m benchmarks --cases peers        # SD UNet: dense vs tomesd vs gridattn (benchmarks/peers.py)
    python -m benchmarks --cases heads        # per-head groupings / shared tokens vs uniform grid, same stride
    python -m benchmarks --cases parallel     # context parallelism on gloo: dense Ulysses, gridattn, grid-group
                                              # sharding; 8-GPU cost model (benchmarks/parallel.py)
    python -m benchmarks --device cuda --dtype bfloat16 --cases attn   # on a GPU (CUDA events)
    python -m benchmarks relpos [--tokens 64] # benchmarks/relpos_bias_cost.py

Analysis scripts quoted in RESULTS.md: ``python -m benchmarks.sam_block`` (one SAM global block's
kernels and page faults), ``python -m benchmarks.attention_share`` (the share of a model's forward
that a preset's attention sites take: the ceiling on what the preset can save),
``python -m benchmarks.regional`` (regional vs whole-model compile; also ``--cases regional``).

Writes ``<out>/results.csv``, ``<out>/table.md``, ``<out>/compile.md``, ``<out>/meta.json`` and PNG
plots (with matplotlib) and prints the tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

CASES = ("attn", "sam", "sd-unet", "segformer", "regional", "dynamic", "video", "peers", "heads", "parallel")


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small models and sizes: finishes in a few minutes")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated subset of {','.join(CASES)} (default: all); compile time is "
                        "measured in every case")
    p.add_argument("--sizes", default=None, help="attention-core token grid sides (default 32,64,96; quick: 32)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per configuration, interleaved (>= 5; default 7, quick 5)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up runs per configuration after the compiling call (default 2 for the attention "
                        "cases, 1 for the models and with --quick)")
    p.add_argument("--model-runs", type=int, default=None,
                   help="timed runs for the whole-model cases (default: --runs, full size 5)")
    p.add_argument("--out", default=None,
                   help="output folder (default benchmarks/results; with --quick benchmarks/out/quick, git-ignored)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu); on cuda, CUDA events time the runs "
                                                   "and torch.cuda.max_memory_allocated gives the peak memory")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32): models and "
                                                      "floating inputs are cast to it")
    p.add_argument("--keep-cache", action="store_true",
                   help="use the usual inductor cache (default: a fresh, empty cache folder, so compile "
                        "times are cold)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["relpos"]:
        from benchmarks import relpos_bias_cost

        return relpos_bias_cost.main(argv[1:]) or 0
    args = _args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - set(CASES)
    if unknown:
        print(f"unknown case(s) {sorted(unknown)}; known: {', '.join(CASES)}", file=sys.stderr)
        return 2
    runs = args.runs or (5 if args.quick else 7)
    if runs < 5:
        print("--runs must be >= 5 (the median of fewer runs is noise)", file=sys.stderr)
        return 2
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    model_runs = args.model_runs or (runs if args.quick else 5)
    sizes = [int(s) for s in (args.sizes or ("32" if args.quick else "32,64,96")).split(",")]
    here = os.path.dirname(os.path.abspath(__file__))
    out = args.out or (os.path.join(here, "out", "quick") if args.quick else os.path.join(here, "results"))
    os.makedirs(out, exist_ok=True)
    if not args.keep_cache:  # before torch reads its config
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="gridattn-bench-inductor-")
        os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
        os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"

    import torch

    from benchmarks import cases as C
    from benchmarks import common
    from gridattn_fx.tools.target import Target

    try:
        target = Target.parse(args.device, args.dtype)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2

    started = time.time()
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python -m benchmarks " + " ".join(argv),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs ({_cpu_name()}), "
                   f"{_mem_gib():.0f} GiB RAM, {torch.get_num_threads()} torch threads",
        "device": target.describe(),
        "gpu": (torch.cuda.get_device_name() if torch.cuda.is_available()
                else "none: no GPU is available to this run; CPU results only"),
        "runs": runs, "model_runs": model_runs, "warmup": warmup,
        "model_warmup": args.warmup if args.warmup is not None else 1,
        "load_average_start": common.load_average(),
    }
    print(f"gridattn-fx benchmarks: torch {meta['torch']}, {meta['machine']}; running on {meta['device']}")
    print(f"command: {meta['command']}  (load average {meta['load_average_start']:.2f})")

    # One throwaway compile: the one-time costs of the first inductor compile in a process
    # (imports, compiler probing) must not land on the first case's baseline.
    with torch.no_grad():
        torch.compile(lambda t: (t * 2).sin(), backend="inductor")(torch.randn(8, device=target.device))
    torch._dynamo.reset()

    rows = []
    memory = not args.no_memory
    if "attn" in cases:
        rows += C.attention_cases(sizes, runs=runs, warmup=warmup, echo=print, memory=memory, target=target)
    model_warmup = args.warmup if args.warmup is not None else 1
    if "heads" in cases:
        rows += C.heads_cases(sizes, runs=runs, warmup=warmup, echo=print, memory=memory, target=target)
    if "dynamic" in cases:
        rows += C.dynamic_cases(sizes, runs=runs, warmup=warmup, echo=print, memory=memory, target=target)
    rows += C.model_cases([c for c in cases if c not in ("attn", "regional", "dynamic", "video", "peers", "heads",
                                                         "parallel")],
                          quick=args.quick,
                          runs=model_runs, warmup=model_warmup, echo=print, memory=memory, target=target)
    if "regional" in cases:  # benchmarks/regional.py: regional vs whole-model compile
        from benchmarks import regional

        rows += regional.regional_cases(quick=args.quick, runs=model_runs, warmup=model_warmup, echo=print,
                                        target=target)
    if "video" in cases:  # benchmarks/video.py: video block and Wan, grid vs window vs flex
        from benchmarks import video

        rows += video.video_cases(quick=args.quick, runs=runs, warmup=warmup, model_runs=model_runs,
                                  model_warmup=model_warmup, echo=print, memory=memory, target=target)
    if "peers" in cases:  # benchmarks/peers.py: dense vs tomesd vs gridattn on the SD UNet
        from benchmarks import peers

        rows += peers.peers_cases(quick=args.quick, runs=model_runs, warmup=model_warmup, echo=print,
                                  memory=memory, target=target)
    if "parallel" in cases:  # benchmarks/parallel.py: its own processes; prints parallel: lines, writes parallel.csv
        from benchmarks import parallel

        parallel.run(args.quick, [2] if args.quick else [2, 4], 1 if args.quick else 2, 3 if args.quick else 5,
                     os.path.join(out, "parallel"), echo=print)
    meta["load_average_end"] = common.load_average()
    meta["wall_s"] = round(time.time() - started, 1)

    print()
    print(f"device: {meta['device']}")
    print(common.table(rows))
    compile_md = compile_table(rows)
    print()
    print(compile_md)
    common.write_csv(rows, os.path.join(out, "results.csv"))
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(f"device: {meta['device']}\n\n" + common.markdown_table(rows) + "\n")
    with open(os.path.join(out, "compile.md"), "w") as f:
        f.write(compile_md + "\n")
    extra = [f"- {r.case} {r.size} {r.config}: {r.extra_kernel_names}" for r in rows if r.extra_kernel_names]
    with open(os.path.join(out, "extra_kernels.md"), "w") as f:
        f.write("\n".join(extra) + "\n")
    pngs = common.plots(rows, out)
    meta["plots"] = [os.path.basename(p) for p in pngs]
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(f"\nwrote {out}/results.csv, table.md, compile.md, meta.json and {len(pngs)} plots "
          f"in {meta['wall_s']:.0f} s (load average at the end {meta['load_average_end']:.2f})")
    return 0


def compile_table(rows) -> str:
    """Case 5: the gridattn pass's wall time against the whole compile, per case and size."""
    head = ["case", "size", "inductor compile s", "gridattn s2 compile s", "pass s", "pass / inductor compile",
            "pass / gridattn compile"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = {}
    for r in rows:
        by.setdefault((r.case, r.size), {})[r.config] = r
    for (case, size), rs in by.items():
        ind, grid = rs.get("inductor"), rs.get("gridattn s2")
        if ind is None or grid is None:
            continue
        lines.append(f"| {case} | {size} | {ind.compile_s:.1f} | {grid.compile_s:.1f} | {grid.pass_s:.2f} | "
                     f"{100 * grid.pass_s / ind.compile_s:.1f}% | {100 * grid.pass_s / grid.compile_s:.1f}% |")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _mem_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return float("nan")


if __name__ == "__main__":
    sys.exit(main())
