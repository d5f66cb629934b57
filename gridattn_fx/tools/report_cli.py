"""``python -m gridattn_fx report MODEL``: build a zoo model from its config (or call a user's
``module:callable``), run the pass, and print the site table with totals and whole-model FLOPs
before and after."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
from collections import Counter

import torch

from ..config.options import GridAttnConfig
from ..config.presets import PRESETS, preset_for_model
from ..frontends.api import capture, rewrite
from ..ir.op_catalogue import CAT, INDEX, PAD, RESHAPE, rule
from ..reasons import SkipKind
from .flops import count_flops


class ReportError(Exception):
    """A bad model name or option: ``python -m gridattn_fx`` prints it as one line and exits 2."""


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?",
                        help="zoo model name, e.g. timm:samvit_base_patch16, sam:vit_b, diffusers:unet-sd21 "
                             "(--list shows them), or module:callable returning (model, example_inputs)")
    parser.add_argument("--list", action="store_true", help="list the zoo models and exit")
    parser.add_argument("--full", action="store_true", help="the real config and input size (default: small)")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="option preset (default: the model family's)")
    parser.add_argument("--stride", type=int, default=None)
    parser.add_argument("--min-image-tokens", type=int, default=None,
                        help="default: the preset's for --full, 0 for the small models")
    parser.add_argument("--implementation", choices=("grouped", "masked"), default=None)
    parser.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                        help="builder option, e.g. fused_attn=False or attn_processor=classic (repeatable); "
                             "for module:callable, a keyword argument of the callable")


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(text, text)


# How the totals name a lost layout, by the catalogue kind of the op that lost it.
_LOSSES = {
    RESHAPE: "a reshape that splits or merges the image axes (a window partition: windowed attention)",
    PAD: "padding of the image axes (to the window size: windowed attention)",
    INDEX: "indexing that drops or reorders image tokens",
    CAT: "a concatenation of two image layouts",
}


def skip_label(site) -> str:
    """How the totals name a skipped site's reason: its kind, and for a lost layout what lost it
    (from the report's structured fields, never from the reason's words)."""
    if site.skip is None:
        return "not decided"
    if site.skip in (SkipKind.NO_QUERY_LAYOUT, SkipKind.NO_KEY_LAYOUT):
        side = "query" if site.skip is SkipKind.NO_QUERY_LAYOUT else "key"
        if site.lost_at is None:
            return f"{side} tokens have no image layout: no conv/pool/interpolate output reaches them"
        op_rule = rule(site.lost_at)
        phrase = _LOSSES.get(op_rule.kind) if op_rule is not None else None
        return f"{side} image layout lost at " + (phrase or site.lost_at)
    return site.skip.value


def _list_models(echo) -> int:
    from .. import zoo

    width = max(len(n) for n in zoo.names())
    for name in zoo.names():
        e = zoo.entry(name)
        missing = "" if zoo.library_available(name) else f"  [{e.library} not installed: bash scripts/install.sh]"
        echo(f"{name.ljust(width)}  {e.description}{missing}")
    return 0


def _builder_options(pairs) -> dict:
    out = {}
    for kv in pairs:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise ReportError(f"--model-option takes KEY=VALUE, got {kv!r}")
        out[key] = _parse_value(value)
    return out


def _user_callable(spec: str):
    """``module:callable`` (the callable may be a dotted attribute path) -> the callable."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ReportError(f"{spec!r} is neither a zoo model (python -m gridattn_fx report --list) "
                          "nor module:callable")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        raise ReportError(f"cannot import module {module_name!r} of {spec!r} ({err}); give a zoo model "
                          "name (--list) or an importable module:callable") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ReportError(f"{spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ReportError(f"{spec!r} is not callable")
    return obj


def _zoo_library(name: str) -> str | None:
    """The library a zoo name needs ("torch" for plain-torch models); None when ``name`` is not a
    zoo name (then it is a module:callable). Unknown names in a zoo family are a ReportError."""
    from .. import zoo

    if name in zoo.names():
        return zoo.entry(name).library
    if name.startswith("timm:"):  # any timm model name works (zoo.build)
        return "timm"
    if name.split(":")[0] in {n.split(":")[0] for n in zoo.names() if ":" in n}:
        raise ReportError(f"unknown zoo model {name!r} (python -m gridattn_fx report --list shows them)")
    return None


def resolve_model(name: str, small: bool, builder_options: dict):
    """``(model, example_inputs)`` for a zoo name or a ``module:callable``; ReportError when the
    name is unknown or building fails."""
    from .. import zoo

    library = _zoo_library(name)
    if library is not None:
        if library != "torch" and importlib.util.find_spec(library) is None:
            raise ReportError(f"{name!r} needs {library}, which is not installed; run 'bash scripts/install.sh'")
        build, what = (lambda **kw: zoo.build(name, small=small, **kw)), "zoo model"
    else:
        build, what = _user_callable(name), "callable"
    try:
        built = build(**builder_options)
    except Exception as err:  # the library's own error, as one line
        raise ReportError(f"building {what} {name!r} failed: {type(err).__name__}: {_one_line(err)} "
                          "(-v shows the traceback)") from err
    if not (isinstance(built, (tuple, list)) and len(built) == 2 and isinstance(built[0], torch.nn.Module)):
        raise ReportError(f"{name!r} must return (model, example_inputs), got {type(built).__name__}")
    model, inputs = built
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    return model, inputs


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else ""


def _report_options(args) -> dict:
    """The pass's options from the command line, validated (a bad value is a ReportError)."""
    options = {"preset": args.preset or preset_for_model(args.model)}
    if args.stride is not None:
        options["stride"] = args.stride
    if args.min_image_tokens is not None:
        options["min_image_tokens"] = args.min_image_tokens
    elif not args.full and _zoo_library(args.model) is not None:
        options["min_image_tokens"] = 0  # the small zoo configs have small images on purpose
    if args.implementation:
        options["implementation"] = args.implementation
    try:
        GridAttnConfig.from_options(options)
    except (TypeError, ValueError) as err:
        raise ReportError(str(err).replace("option 'stride'", "--stride")
                          .replace("option 'min_image_tokens'", "--min-image-tokens")) from None
    return options


def run_report(args, echo=print) -> int:
    if args.list:
        return _list_models(echo)
    if not args.model:
        raise ReportError("give a model: a zoo name (python -m gridattn_fx report --list) or module:callable")
    name = args.model
    options = _report_options(args)  # before building: a bad option fails fast
    model, inputs = resolve_model(name, small=not args.full, builder_options=_builder_options(args.model_option))

    shapes = ", ".join("x".join(map(str, x.shape)) for x in inputs if isinstance(x, torch.Tensor))
    size = "module:callable" if _zoo_library(name) is None else (
        "full config, random weights" if args.full else "small config, random weights")
    echo(f"{name} ({size}), inputs {shapes}; options {options}")
    gm, report = rewrite(model, inputs, **options)
    echo(str(report))
    echo("")
    kinds = Counter(skip_label(s) for s in report.skipped)
    echo(f"sites found: {len(report.sites)}; rewritten: {len(report.rewritten)}; skipped: {len(report.skipped)}")
    for kind, n in kinds.most_common():
        echo(f"  skipped {n:>3} x  {kind}")
    before, after = report.flops()
    echo(f"attention FLOPs:   {before / 1e9:10.2f} G -> {after / 1e9:10.2f} G"
         + (f"  ({100 * (1 - after / before):.1f}% less)" if before else ""))
    # Both counts on captured graphs (the original one and the rewritten one): the same ops the
    # compiled model runs, and no per-module hooks on library models.
    total_before, total_after = count_flops(capture(model, inputs), inputs), count_flops(gm, inputs)
    echo(f"whole-model FLOPs: {total_before / 1e9:10.2f} G -> {total_after / 1e9:10.2f} G"
         + (f"  ({100 * (1 - total_after / total_before):.1f}% less)" if total_before else "")
         + "  (FlopCounterMode, one forward)")
    return 1 if report.failure else 0
