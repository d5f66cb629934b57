"""Longer fuzz runs outside pytest (tests/fuzz/README.md).

    python -m tests.fuzz --cases 2000 --seed 0        # seeds 0..1999
    python -m tests.fuzz --seed 123 --cases 1 -v      # rerun one failing case, with its report
    python -m tests.fuzz --spec "Spec(seed=...)"      # run a (hand-edited) spec text
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

import torch


def main(argv=None) -> int:
    from . import check
    from . import generator as gen

    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100, help="number of seeds to run (default 100)")
    ap.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    ap.add_argument("--spec", help="run this spec text instead of generated ones")
    ap.add_argument("--compiled", action="store_true", help="also run each case through torch.compile")
    ap.add_argument("--dynamic", action="store_true", help="with --compiled: compile with dynamic=True")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every failing case in full")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    if args.spec:
        specs = [eval(args.spec, {**vars(gen), "Spec": gen.Spec, "BlockSpec": gen.BlockSpec})]
    else:
        compiled = "dynamic" if args.compiled and args.dynamic else args.compiled
        specs = [gen.random_spec(s, compiled=compiled) for s in range(args.seed, args.seed + args.cases)]
    counts = collections.Counter()
    decisions = collections.Counter()
    video_decisions = collections.Counter()   # the sites of video cases (Spec.frames > 0)
    new_failures = []
    start = time.time()
    for spec in specs:
        result = check.run_case(spec)
        decisions.update(result.decisions.values())
        if spec.frames:
            video_decisions.update(result.decisions.values())
        if result.ok:
            counts["pass"] += 1
            continue
        for f in result.failures:
            counts[f"{f.kind} [{f.category or 'NEW'}]"] += 1
        if not result.only_known:
            new_failures.append(result)
        if args.verbose or not result.only_known:
            print(result.describe() if args.verbose else
                  f"seed {spec.seed}: " + "; ".join(str(f) for f in result.failures if f.category not in check.KNOWN_BUGS))
    print(f"\n{len(specs)} cases in {time.time() - start:.1f}s; sites: {dict(decisions)}")
    print(f"  of which video cases: {sum(1 for s in specs if s.frames)}; their sites: {dict(video_decisions)}")
    for k, n in sorted(counts.items()):
        print(f"  {k}: {n}")
    print(f"cases with failures not explained by KNOWN_BUGS: {len(new_failures)}"
          + (f" (seeds {[r.spec.seed for r in new_failures][:50]})" if new_failures else ""))
    return 1 if new_failures else 0


if __name__ == "__main__":
    sys.exit(main())
