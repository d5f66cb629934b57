"""Fingerprints of what the pass does to the zoo's models, to show that a refactor changed nothing.

    python scripts/rewrite_fingerprints.py dump OUT.json        # every zoo model x 4 option sets
    python scripts/rewrite_fingerprints.py compare A.json B.json

``dump`` runs ``gridattn_fx.rewrite()`` on every zoo model (small configs, random weights, seeded)
under four option sets (grid, window, masked with a video stride, stride 4 without regroup
motion) and stores each report's text and the rewritten graph's code without comments (they cite
source lines). Run it with ``PYTHONPATH=<checkout>`` on two checkouts, then ``compare``: it lists
every case whose report or graph differs (a helper's qualified name is normalised by
``--same OLD=NEW``, e.g. after a module moved).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings

OPTIONS = [
    {"stride": 2, "min_image_tokens": 0},
    {"stride": 2, "min_image_tokens": 0, "grouping": "window"},
    {"stride": (1, 2, 2), "min_image_tokens": 0, "implementation": "masked"},
    {"stride": 4, "min_image_tokens": 0, "move_regrouping": False},
]


def _code(code: str) -> str:
    lines = [re.sub(r"\s+#.*$", "", line) for line in code.splitlines() if not line.strip().startswith("#")]
    return "\n".join(line for line in lines if line.strip())


def dump(path: str) -> None:
    import torch

    import gridattn_fx
    from gridattn_fx import zoo

    warnings.simplefilter("ignore")
    out = {}
    for name in zoo.names():
        for i, options in enumerate(OPTIONS):
            key = f"{name}#{i}"
            try:
                torch.manual_seed(0)
                model, inputs = zoo.build(name, small=True)
                inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
                gm, report = gridattn_fx.rewrite(model, inputs, **options)
                out[key] = {"report": re.sub(r"graph #\d+", "graph #N", str(report)), "code": _code(gm.code)}
            except Exception as err:  # recorded: the other checkout must fail alike
                out[key] = {"error": f"{type(err).__name__}: {err}"[:300]}
            print(key, "error" if "error" in out[key] else "ok", flush=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def compare(a_path: str, b_path: str, same: list[str]) -> int:
    with open(a_path) as f:
        a = json.load(f)
    with open(b_path) as f:
        b = json.load(f)
    pairs = [s.split("=", 1) for s in same]
    differing = []
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key, {}), b.get(key, {})
        code = right.get("code", "")
        for old, new in pairs:
            code = code.replace(new, old)
        if left.get("report") != right.get("report") or left.get("code") != code or "error" in left or "error" in right:
            differing.append(key)
    rewritten = sum(v.get("report", "").count(" rewritten ") for v in a.values())
    print(f"{len(a)} cases, {rewritten} sites rewritten; differing: {differing or 'none'}")
    return 1 if differing else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dump").add_argument("out")
    cmp = sub.add_parser("compare")
    cmp.add_argument("a")
    cmp.add_argument("b")
    cmp.add_argument("--same", action="append", default=[], metavar="OLD=NEW")
    args = parser.parse_args(argv)
    if args.command == "dump":
        dump(args.out)
        return 0
    return compare(args.a, args.b, args.same)


if __name__ == "__main__":
    sys.exit(main())
