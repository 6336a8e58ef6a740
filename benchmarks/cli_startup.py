"""How long does `tfmem` take to answer the commands that do no work?

    python benchmarks/cli_startup.py              # 5 runs of each command
    python benchmarks/cli_startup.py --runs 10

Each command runs in a fresh process (`python -m tfmem ...`), as a user's shell would start it, with
its output discarded; runs of different commands are interleaved so that load from other processes
hits them alike. Prints the median and the slowest wall time per command, and whether the process
imported torch. The goal (issue 9) is `--help` and `--version` under 1.5 s, and a command's own
`--help` (`tfmem profile --help`, `tfmem estimate --help`) as quick; `tfmem recipes` validates the
shipped recipes, whose technique modules import torch and transformers, and is shown for scale.
The last line is the slowest median of the `--help` and `--version` commands.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "tfmem --help": ["--help"],
    "tfmem --version": ["--version"],
    "tfmem (no command)": [],
    "tfmem profile --help": ["profile", "--help"],
    "tfmem estimate --help": ["estimate", "--help"],
    "tfmem recipes": ["recipes"],
}
# Run the entry point, then report whether torch was imported (on stderr, apart from the command's output).
PROBE = (
    "import sys, runpy; sys.argv = ['tfmem'] + sys.argv[1:]\n"
    "try:\n    runpy.run_module('tfmem', run_name='__main__')\n"
    "finally:\n    print('TORCH=' + str('torch' in sys.modules), file=sys.stderr)\n"
)


def run_once(args: list[str]) -> tuple[float, bool]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PROBE, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    seconds = time.perf_counter() - started
    return seconds, "TORCH=True" in result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    options = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    torch_imported: dict[str, bool] = {}
    for _ in range(options.runs):
        for name, args in COMMANDS.items():
            seconds, imported = run_once(args)
            times[name].append(seconds)
            torch_imported[name] = imported
    print(f"{'command':<24} {'median s':>9} {'slowest s':>10}  imports torch")
    for name, values in times.items():
        print(f"{name:<24} {statistics.median(values):>9.2f} {max(values):>10.2f}  {'yes' if torch_imported[name] else 'no'}")
    quick = [name for name in COMMANDS if "--help" in name or "--version" in name]
    slower = max(statistics.median(times[name]) for name in quick)
    print(f"Headline: tfmem --help / --version / profile --help / estimate --help answer in {slower:.2f} s or less "
          f"(median of {options.runs}; goal < 1.5 s)")


if __name__ == "__main__":
    main()
