"""Print the Dynamo-graph ops of one attention module of a zoo model: which attention form it uses.

    python scripts/zoo_attention_ops.py timm:samvit_base_patch16 --module 'blocks\\.1\\.attn$'
    python scripts/zoo_attention_ops.py diffusers:unet-sd21 --opt attn_processor=classic
    python scripts/zoo_attention_ops.py --all            # every zoo model, first attention module

The graph is ``gridattn_fx.capture(model, inputs)`` (the graph the backend sees). A node belongs to
a module when the module is the innermost entry of its ``nn_module_stack``; ``--module`` is a
regex on that path (default: the first module whose path ends in an attention-like name).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys

import torch

ATTN_RE = r"(attn|attn1|attention|self_attn|attentions\.\d+)$"


def module_path(node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return normalize_path(path)


def normalize_path(path: str) -> str:
    """``L['self'].__dict__['_modules']['down_blocks'].0.attn1`` -> ``down_blocks.0.attn1``."""
    path = re.sub(r"^L\['self'\]|^L__self__", "", path)
    path = path.replace(".__dict__['_modules']", "")
    path = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", path)
    return path.strip(".")


def describe(node) -> str:
    def fmt(a):
        if isinstance(a, torch.fx.Node):
            return a.name
        if isinstance(a, (list, tuple)):
            inner = ", ".join(fmt(x) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
        if isinstance(a, torch.dtype):
            return str(a)
        if isinstance(a, float):
            return f"{a:.6g}"
        return repr(a)

    t = node.target
    if node.op == "call_function":
        tname = getattr(t, "__module__", "") or ""
        tname = (tname + "." if tname and not tname.startswith("_operator") else
                 "operator." if tname.startswith("_operator") else "") + getattr(t, "__name__", str(t))
    elif node.op == "call_method":
        tname = f".{t}"
    else:
        tname = f"{node.op}:{t}"
    args = ", ".join([fmt(a) for a in node.args] + [f"{k}={fmt(v)}" for k, v in node.kwargs.items()])
    val = node.meta.get("example_value", node.meta.get("val"))
    shape = f"  # {tuple(val.shape)} {str(val.dtype).replace('torch.', '')}" if isinstance(val, torch.Tensor) else ""
    return f"{node.name} = {tname}({args}){shape}"


def attention_ops(gm, pattern: str | None):
    paths = []
    for n in gm.graph.nodes:
        p = module_path(n)
        if p is not None and p not in paths:
            paths.append(p)
    if pattern is None:
        cands = [p for p in paths if re.search(ATTN_RE, p)]
    else:
        cands = [p for p in paths if re.search(pattern, p)]
    if not cands:
        return None, []
    target = cands[0]
    nodes = [n for n in gm.graph.nodes if module_path(n) is not None
             and (module_path(n) == target or module_path(n).startswith(target + "."))]
    return target, nodes


def run(name: str, opts: dict, pattern: str | None, out=sys.stdout):
    import gridattn_fx
    from gridattn_fx import zoo

    model, inputs = zoo.build(name, **opts)
    with torch.no_grad():
        gm = gridattn_fx.capture(model, inputs)
    target, nodes = attention_ops(gm, pattern)
    label = name + "".join(f" {k}={v!r}" for k, v in opts.items())
    print(f"### {label}: module {target!r}, {len(nodes)} nodes", file=out)
    for n in nodes:
        print("    " + describe(n), file=out)
    print(file=out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?")
    ap.add_argument("--module", default=None, help="regex on the module path (default: first attention module)")
    ap.add_argument("--opt", action="append", default=[], help="builder option KEY=VALUE (Python literal)")
    ap.add_argument("--all", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    opts = {}
    for kv in a.opt:
        k, _, v = kv.partition("=")
        try:
            opts[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            opts[k] = v
    if a.all:
        from gridattn_fx import zoo
        for name in zoo.names():
            if zoo.library_available(name):
                run(name, opts, a.module)
    else:
        if not a.name:
            ap.error("a zoo model name or --all")
        run(a.name, opts, a.module)


if __name__ == "__main__":
    main()
