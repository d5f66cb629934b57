"""Command line: ``python -m gridattn_fx <command>`` (also installed as ``gridattn-fx``).

Commands:
  demo    compile the built-in high-resolution ViT with inductor and with gridattn, show the
          rewrite report, and compare latency, outputs and attention FLOPs.
  report  build a model-zoo model from its config (or call a module:callable that returns
          (model, example_inputs)), run the pass, print the site table with totals and
          whole-model FLOPs before and after. ``report --list`` lists the zoo.
  coverage  diffusers' image and video transformer / UNet classes (tiny configs): which are
          rewritten with no declaration, and why the others stay dense (a Markdown table).

A bad model name or option ends in one line on stderr and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    from gridattn_fx.tools.demo import add_demo_arguments

    parser = argparse.ArgumentParser(
        prog="python -m gridattn_fx",
        description="gridattn-fx: Grid-Attention as a torch.compile backend.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="log the gridattn_fx library at INFO (-v) or DEBUG (-vv) level",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    demo = sub.add_parser(
        "demo",
        help="inductor vs gridattn on a built-in 1024x1024 ViT: report, latency, FLOPs",
        description=(
            "Compile a built-in high-resolution ViT (random weights, nothing downloaded) with "
            'torch.compile(backend="inductor") and with backend="gridattn", print the rewrite '
            "report, then time both interleaved and compare their outputs."
        ),
    )
    add_demo_arguments(demo)
    from gridattn_fx.tools.report_cli import add_report_arguments

    report = sub.add_parser(
        "report",
        help="the rewrite report of a model-zoo model (timm:..., transformers:..., diffusers:..., sam:vit_b) "
             "or of module:callable returning (model, example_inputs)",
        description="Build a zoo model from its config (random weights), or call module:callable for "
                    "(model, example_inputs), run the gridattn pass, and print every site's decision "
                    "with totals and FLOPs before and after.",
    )
    add_report_arguments(report)
    from gridattn_fx.tools.coverage import add_coverage_arguments

    coverage = sub.add_parser(
        "coverage",
        help="which diffusers transformer / UNet classes are rewritten with no declaration, and why not",
        description="Build each diffusers image / video transformer and UNet class from a tiny config, compile "
                    "it through the gridattn pass, and print a Markdown table: rewritten automatically, or "
                    "dense and why.",
    )
    add_coverage_arguments(coverage)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("gridattn_fx").setLevel(logging.DEBUG if args.verbose > 1 else logging.INFO)

    if args.command == "demo":
        from gridattn_fx.tools.demo import demo_from_args

        return demo_from_args(args, echo=lambda line: print(line, flush=True))
    if args.command == "report":
        from gridattn_fx.tools.report_cli import ReportError, run_report

        try:
            return run_report(args, echo=lambda line: print(line, flush=True))
        except ReportError as err:
            logging.getLogger("gridattn_fx").info("report failed", exc_info=True)  # -v: the traceback
            print(f"{parser.prog} report: error: {err}", file=sys.stderr)
            return 2
    if args.command == "coverage":
        from gridattn_fx.tools.coverage import run_coverage

        try:
            return run_coverage(args, echo=lambda line: print(line, flush=True))
        except ValueError as err:
            print(f"{parser.prog} coverage: error: {err}", file=sys.stderr)
            return 2
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects first
    return 2


if __name__ == "__main__":
    sys.exit(main())
