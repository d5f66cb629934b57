"""``python -m benchmarks.versions REV``: the attention block under this checkout's pass and under the
pass of an earlier commit, interleaved in one process, to tell a regression from noise.

    python -m benchmarks.versions a566bb3^            # the block at 64x64 tokens, stride 2
    python -m benchmarks.versions a566bb3^ --size 96 --rounds 5 --runs 9

The package at REV is exported with ``git archive`` into a temporary folder under another name
(``gridattn_fx_at_rev``; its own imports are relative) and its backend function is called directly,
so both versions compile the same block in the same process. Each round times inductor, the
earlier version and this one interleaved (median of ``--runs`` after warm-up); the rounds' ratios
over inductor are printed with their spread, and the inductor code of both versions is compared
kernel by kernel (an identical program cannot be a regression, whatever the clock says).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile

import torch

from . import common
from .models import AttentionBlock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_version(rev: str):
    """The gridattn_fx package at ``rev``, imported as ``gridattn_fx_at_rev``."""
    folder = tempfile.mkdtemp(prefix="gridattn-version-")
    archive = os.path.join(folder, "package.tar")
    subprocess.run(["git", "-C", REPO, "archive", "-o", archive, rev, "gridattn_fx"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    package = os.path.join(folder, "gridattn_fx_at_rev")
    os.rename(os.path.join(folder, "gridattn_fx"), package)
    # its custom ops (the layout markers) under their own namespace: one process cannot define
    # the ``gridattn`` library twice
    for root, _, files in os.walk(package):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path) as f:
                    text = f.read()
                text = text.replace('Library("gridattn", "DEF")', 'Library("gridattn_at_rev", "DEF")')
                text = text.replace("torch.ops.gridattn.", "torch.ops.gridattn_at_rev.")
                with open(path, "w") as f:
                    f.write(text)
    sys.path.insert(0, folder)
    return importlib.import_module("gridattn_fx_at_rev")


def _program(code: str) -> str:
    """Inductor's output code without what differs between two compiles of one program: comments
    (source node names, stack traces) and the cache paths of the compiled kernels."""
    lines = [re.sub(r"/tmp/\S+", "<path>", line) for line in code.splitlines() if not line.strip().startswith("#")]
    return "\n".join(line for line in lines if line.strip())


def _backend(package):
    """The package's backend callable, wherever that version keeps it."""
    for path in ("frontends.backend", "dynamo_backend"):
        try:
            return importlib.import_module(f"{package.__name__}.{path}").backend
        except ImportError:
            continue
    return package.backend


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.versions", description=__doc__.splitlines()[0])
    p.add_argument("rev", help="the earlier commit (any git revision)")
    p.add_argument("--size", type=int, default=64, help="token grid side (default 64: 64x64 tokens)")
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="independent interleaved rounds (default 5)")
    p.add_argument("--runs", type=int, default=9, help="timed runs per configuration and round (default 9)")
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)

    import gridattn_fx
    from gridattn_fx.frontends.backend import backend as current_backend

    earlier = load_version(args.rev)
    earlier_backend = _backend(earlier)
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", args.rev], capture_output=True,
                            text=True, check=True).stdout.strip()
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    options = {"stride": args.stride, "min_image_tokens": 0}

    torch.manual_seed(0)
    block = AttentionBlock(2, 64).eval()
    x = torch.randn(1, block.channels(), args.size, args.size)
    compiled = {
        "inductor": torch.compile(block, backend="inductor"),
        f"gridattn at {commit}": torch.compile(block, backend=lambda gm, ex: earlier_backend(gm, ex, options=options)),
        f"gridattn at {head}": torch.compile(block, backend=lambda gm, ex: current_backend(gm, ex, options=options)),
    }
    codes, outputs = {}, {}
    with torch.no_grad():
        for name, fn in compiled.items():
            with common.capture_inductor_code() as captured:
                outputs[name] = fn(x)
            codes[name] = captured
    names = list(compiled)
    print(f"attention block {args.size}x{args.size} tokens, stride {args.stride}: {gridattn_fx.__file__} (HEAD "
          f"{head}) against {earlier.__file__} ({args.rev} = {commit})")
    stats = {name: common.code_stats(codes[name]) for name in names[1:]}
    programs = [[_program(c) for c in codes[name]] for name in names[1:]]
    same = programs[0] == programs[1]
    for name in names[1:]:
        st = stats[name]
        print(f"  {name}: {len(st.kernels)} kernels ({len(st.layout_kernels)} copy-only), {len(st.extern_calls)} "
              f"extern calls, max |out - {names[1]}| {common.max_abs_diff(outputs[name], outputs[names[1]]):.2g}")
    print(f"  generated code identical (comments and file paths aside): {same}")
    if not same:
        diff = difflib.unified_diff("\n".join(programs[0]).splitlines(), "\n".join(programs[1]).splitlines(),
                                    names[1], names[2], n=0, lineterm="")
        print("\n".join(f"    {line}" for line in list(diff)[:40]))

    ratios = {name: [] for name in names[1:]}
    for r in range(args.rounds):
        with common.ForeignCpu() as foreign:
            times = common.interleaved({n: (lambda f=compiled[n]: f(x)) for n in names}, runs=args.runs,
                                       warmup=args.warmup)
        base = statistics.median(times["inductor"])
        line = []
        for name in names[1:]:
            ratio = base / statistics.median(times[name])
            ratios[name].append(ratio)
            line.append(f"{name} {ratio:.2f}x")
        print(f"  round {r + 1}: inductor {base:.1f} ms; " + ", ".join(line)
              + f" (other processes {100 * foreign.share:.0f}% of the CPUs)")
    for name, rs in ratios.items():
        print(f"{name}: median {statistics.median(rs):.2f}x over inductor, rounds {min(rs):.2f}-{max(rs):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
