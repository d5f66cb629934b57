"""``python -m gridattn_fx report NAME``: build a zoo model from its config, run the pass, and print
the site table with totals and whole-model FLOPs before and after."""

from __future__ import annotations

import argparse
import re
from collections import Counter

import torch

from .flops import count_flops
from .presets import PRESETS, preset_for_model


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="zoo model name, e.g. timm:samvit_base_patch16, sam:vit_b, "
                                      "diffusers:unet-sd21 (python -m gridattn_fx report --list)")
    parser.add_argument("--full", action="store_true", help="the real config and input size (default: small)")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="option preset (default: the model family's)")
    parser.add_argument("--stride", type=int, default=None)
    parser.add_argument("--min-image-tokens", type=int, default=None,
                        help="default: the preset's for --full, 0 for the small models")
    parser.add_argument("--implementation", choices=("grouped", "masked"), default=None)
    parser.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                        help="builder option, e.g. fused_attn=False or attn_processor=classic (repeatable)")


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(text, text)


_REASON_KINDS = (  # (words in the reason, how the totals name it), first match wins
    ("key: no proven", "key tokens have no image layout (cross-attention to text/prompts)"),
    ("windows", "image layout lost at a window partition (windowed attention)"),
    ("window size", "image layout lost at padding to the window size (windowed attention)"),
    ("no spatial source", "no image layout: no conv/pool/interpolate output reaches it (non-image tokens)"),
    ("causal", "causal attention"),
    ("min_image_tokens", "fewer image tokens than min_image_tokens"),
    ("include", "left out by include/exclude"),
    ("exclude", "left out by include/exclude"),
    ("stride 1", "stride 1"),
    ("symbolic", "symbolic (dynamic) sizes"),
)


def _reason_kind(reason: str) -> str:
    """Group skip reasons for the totals."""
    for words, kind in _REASON_KINDS:
        if words in reason:
            return kind
    lost = re.search(r"lost at (\S+)", reason)
    if lost:
        return f"image layout lost at {lost.group(1)}"
    return re.sub(r" \(preset '[^']*'\)", "", reason).split(":")[0].strip()


def run_report(args, echo=print) -> int:
    from . import rewrite, zoo

    name = args.model
    if name == "--list":
        for n in zoo.names():
            echo(n)
        return 0
    builder_options = dict(kv.split("=", 1) for kv in args.model_option)
    builder_options = {k: _parse_value(v) for k, v in builder_options.items()}
    model, inputs = zoo.build(name, small=not args.full, **builder_options)
    preset = args.preset or preset_for_model(name)
    options = {"preset": preset}
    if args.stride is not None:
        options["stride"] = args.stride
    if args.min_image_tokens is not None:
        options["min_image_tokens"] = args.min_image_tokens
    elif not args.full:
        options["min_image_tokens"] = 0  # the small configs have small images on purpose
    if args.implementation:
        options["implementation"] = args.implementation

    shapes = ", ".join("x".join(map(str, x.shape)) for x in inputs if isinstance(x, torch.Tensor))
    size = "full" if args.full else "small"
    echo(f"{name} ({size} config, random weights), inputs {shapes}; options {options}")
    gm, report = rewrite(model, inputs, **options)
    echo(str(report))
    echo("")
    kinds = Counter(_reason_kind(s.reason) for s in report.skipped)
    echo(f"sites found: {len(report.sites)}; rewritten: {len(report.rewritten)}; skipped: {len(report.skipped)}")
    for kind, n in kinds.most_common():
        echo(f"  skipped {n:>3} x  {kind}")
    before, after = report.flops()
    echo(f"attention FLOPs:   {before / 1e9:10.2f} G -> {after / 1e9:10.2f} G"
         + (f"  ({100 * (1 - after / before):.1f}% less)" if before else ""))
    # Both counts on captured graphs (the original one and the rewritten one): the same ops the
    # compiled model runs, and no per-module hooks on library models.
    from . import capture

    total_before, total_after = count_flops(capture(model, inputs), inputs), count_flops(gm, inputs)
    echo(f"whole-model FLOPs: {total_before / 1e9:10.2f} G -> {total_after / 1e9:10.2f} G"
         + (f"  ({100 * (1 - total_after / total_before):.1f}% less)" if total_before else "")
         + "  (FlopCounterMode, one forward)")
    return 1 if report.failure else 0
