"""Print the rewrite report of the video transformers of the zoo (which sites are rewritten, the
proven layouts, the reasons for the rest).

    python scripts/video_zoo_report.py                          # stride 2, every video model
    python scripts/video_zoo_report.py diffusers:wan --stride 2,2,2
    python scripts/video_zoo_report.py diffusers:cogvideox --grouping window

Each model is built small in float64 and passed to ``gridattn_fx.rewrite`` (the whole model as one
graph). LTX-Video's tokens are packed outside the model: ``--declare`` prepares the model with the
declared layout ``ImageTokens(frames=..., height=..., width=...)`` first (needs declarations with
``frames``) and reports the regions the prepared model compiles.
"""

from __future__ import annotations

import argparse
import ast

import torch

VIDEO_MODELS = ("diffusers:wan", "diffusers:cogvideox", "diffusers:ltx-video", "diffusers:hunyuan-video")


def parse_stride(text: str):
    value = ast.literal_eval(text)
    return tuple(value) if isinstance(value, (tuple, list)) else int(value)


def report(name: str, stride, grouping: str | None = None) -> str:
    import gridattn_fx
    from gridattn_fx import zoo

    model, inputs = zoo.build(name, dtype=torch.float64)
    options = dict(stride=stride, min_image_tokens=1)
    if grouping is not None:
        options["grouping"] = grouping
    with torch.no_grad():
        _gm, rep = gridattn_fx.rewrite(model, inputs, **options)
    return f"### {name} stride={stride!r}" + (f" grouping={grouping}" if grouping else "") + f"\n{rep}\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", default=list(VIDEO_MODELS))
    ap.add_argument("--stride", default="2", help="an int or a tuple such as 2,2,2")
    ap.add_argument("--grouping", default=None, help="grid (default) or window")
    a = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for name in a.names:
        try:
            print(report(name, parse_stride(a.stride), a.grouping))
        except Exception as exc:  # a report script: show every model even if one fails
            print(f"### {name}: {type(exc).__name__}: {exc}\n")


if __name__ == "__main__":
    main()
