"""The `tfmem` command line. Each command is a module with `add_parser(subparsers)` and `run(args)`;
this entry point only registers them (the accelerate `commands/` pattern).

Start-up stays cheap: a command module imports torch and transformers (several seconds), so only the
command being run is imported. `tfmem --help` and `tfmem --version` import neither: they list the
commands from `COMMANDS` below (tests/test_cli_entry.py checks its help lines match the modules').
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import signal
import sys
from collections.abc import Iterable

from tfmem.errors import ModelConfigError, RecipeError, UnsupportedModelError

# name -> (module, the one-line help that module registers), in the order `tfmem --help` lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "recipes": ("tfmem.cli.recipes", "list the shipped recipes, or print one as YAML"),
    "profile": ("tfmem.cli.profile", "measure peak memory and speed of a few training steps under each recipe"),
    "estimate": ("tfmem.cli.estimate", "predict the peak memory of a training step, without a GPU"),
    "plan": ("tfmem.cli.plan", "find the fastest recipe whose predicted peak fits a memory budget"),
}


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The `tfmem` argument parser.

    Args:
        commands: the commands to build in full (their modules are imported); the others are listed by
            name and help line only, enough for `tfmem --help`. None: all of them.

    Example:
        >>> build_parser(commands=[]).parse_args(["-v"]).verbose
        True
    """
    from tfmem import __version__

    full = set(COMMANDS if commands is None else commands)
    parser = argparse.ArgumentParser(
        prog="tfmem",
        description="Memory recipes, a profiler and a planner for fine-tuning BERT-family models on small GPUs.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what tfmem does (INFO level)")
    parser.add_argument("--version", action="version", version=f"tfmem {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_line) in COMMANDS.items():
        if name in full:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=help_line, add_help=False)
    return parser


# Commands that train for real and measure memory: the `tfmem` program leaves Python's collector as it is for them.
_MEASURING = {"profile"}
# No automatic full collections (threshold of the oldest generation): see `entry`.
_NO_FULL_COLLECTIONS = 1 << 30


def entry() -> None:
    """The `tfmem` program (the `tfmem` script, `python -m tfmem`): `main()` in a process of its own, then exit.

    A short-lived process can skip work a library call cannot: the cyclic garbage collector's full
    collections. Importing torch and transformers makes some 360,000 tracked objects that live until the
    process ends, and Python rescans all of them each time the old generation grows by a quarter, then
    again while it shuts down: about 1.6 s of `tfmem plan`'s 4.9 s for bert-large on 2 cores
    (benchmarks/cli_startup.py). So the program runs its command with young-generation collections only
    (the short-lived cycles a fake step makes are still freed: the peak resident memory of a 23-estimate
    plan is unchanged), and before exiting moves every object to the permanent generation, which the
    collections at shutdown skip. `tfmem profile` trains for real and measures memory: it keeps Python's
    defaults.
    """
    argv = sys.argv[1:]
    if _command_in(argv) not in _MEASURING:
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, _NO_FULL_COLLECTIONS)
    status = main(argv)
    gc.freeze()  # everything is about to go: the collection at exit has nothing to scan
    sys.exit(status)


def _command_in(argv: list[str]) -> str | None:
    """The command `argv` names: its first word that is not an option (tfmem's own options take no value)."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    """Run `tfmem` with `argv` (default: the process's arguments) and return its exit status."""
    try:
        try:
            status = _main(sys.argv[1:] if argv is None else list(argv))
        except SystemExit:  # argparse's --help, --version and usage errors: flush while we can still catch
            sys.stdout.flush()
            raise
        # Flush here, not at interpreter exit: a reader that went away then raises where it is caught.
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # The reader closed the pipe (`tfmem estimate --json | head -c 600`): no one is left to tell. Point
        # stdout at /dev/null so that Python's own flush at exit does not fail again, and exit as a program
        # killed by SIGPIPE would (what `cat big | head` reports).
        _silence_stdout()
        return 128 + signal.SIGPIPE


def _main(argv: list[str]) -> int:
    command = _command_in(argv)
    parser = build_parser([command] if command else [])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except (RecipeError, UnsupportedModelError, ModelConfigError, FileNotFoundError) as e:
        # Expected user errors: the message says what to fix, a traceback would only bury it.
        print(f"tfmem {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tfmem {args.command}: interrupted", file=sys.stderr)
        return 130


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):  # stdout is not a file (captured by a test): nothing to redirect
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
