"""The `tfmem` command line. Each command is a module with `add_parser(subparsers)` and `run(args)`;
this entry point only registers them (the accelerate `commands/` pattern)."""

from __future__ import annotations

import argparse
import logging
import sys

from tfmem.errors import RecipeError, UnsupportedModelError


def build_parser() -> argparse.ArgumentParser:
    from tfmem import __version__
    from tfmem.cli import estimate, plan, profile, recipes

    parser = argparse.ArgumentParser(
        prog="tfmem",
        description="Memory recipes, a profiler and a planner for fine-tuning BERT-family models on small GPUs.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what tfmem does (INFO level)")
    parser.add_argument("--version", action="version", version=f"tfmem {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (recipes, profile, estimate, plan):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except (RecipeError, UnsupportedModelError, FileNotFoundError) as e:
        # Expected user errors: the message says what to fix, a traceback would only bury it.
        print(f"tfmem {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tfmem {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
