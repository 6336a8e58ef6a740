"""How long does `tfmem` take to answer: the commands that do no work, and `tfmem plan`?

    python benchmarks/cli_startup.py              # 5 runs of each command
    python benchmarks/cli_startup.py --runs 10
    python benchmarks/cli_startup.py --only plan  # just the planner's rows

Each command runs in a fresh process (`python -m tfmem ...`), as a user's shell would start it, with
its output discarded; runs of different commands are interleaved so that load from other processes
hits them alike. Prints the median and the slowest wall time per command, its median CPU time (user +
system: what other processes' load hardly changes), and whether the process imported torch. The goals: `--help` and `--version` under 1.5 s, and a command's own `--help`
(`tfmem profile --help`, `tfmem estimate --help`) as quick (issue 9); `tfmem recipes` validates the
shipped recipes, whose technique modules import torch, and is shown for scale.

`tfmem plan` (issue 7: under 5 s on 2 cores for bert-large, 512 tokens, batch 32, an H100 in 8 GiB) is
timed twice: a first call, with an empty estimate cache (a fresh `TFMEM_CACHE_DIR` each run, so it runs
every fake step and imports transformers' modeling code), and a repeated call, whose estimates come
from the cache the first call wrote (tfmem/estimate/cache.py). The plan's output is checked to be the
same both ways. `--tfmem PATH` times another checkout (default: this script's), for before/after figures
from one run of the machine: `python benchmarks/cli_startup.py --tfmem ../before --only plan`.

The last line gives the plan's first-call and repeated medians and the slowest median of the `--help` and
`--version` commands.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

COMMANDS = {
    "tfmem --help": ["--help"],
    "tfmem --version": ["--version"],
    "tfmem (no command)": [],
    "tfmem profile --help": ["profile", "--help"],
    "tfmem estimate --help": ["estimate", "--help"],
    "tfmem recipes": ["recipes"],
}
PLAN = ["plan", "--model", "bert-large-uncased", "--seq-len", "512", "--batch-size", "32", "--gpu", "h100",
        "--budget", "8GiB", "--json"]
PLAN_FIRST = "tfmem plan (first call)"
PLAN_AGAIN = "tfmem plan (repeated)"
# Run the entry point as `python -m tfmem` does, then report whether torch was imported (on stderr, apart
# from the command's output). `entry` exits the process; the report runs at exit.
PROBE = (
    "import sys, atexit\n"
    "atexit.register(lambda: print('TORCH=' + str('torch' in sys.modules), file=sys.stderr))\n"
    "sys.argv = ['tfmem'] + sys.argv[1:]\n"
    "try:\n    from tfmem.cli import entry\nexcept ImportError:  # a checkout from before `entry`\n"
    "    import runpy; runpy.run_module('tfmem', run_name='__main__')\nelse:\n    entry()\n"
)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(args: list[str], checkout: str, workdir: str, env_extra: dict[str, str] | None = None
             ) -> tuple[float, float, bool, str]:
    """(wall seconds, CPU seconds, whether torch was imported, stdout) of one `tfmem ARGS` process."""
    # In a folder of its own: `python -c` imports from the working directory before PYTHONPATH.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=checkout, **(env_extra or {}))
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PROBE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=workdir)
    seconds = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU time (user + system) hardly depends on other processes' load, where wall time does.
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    if "TORCH=" not in result.stderr or (args is PLAN and result.returncode not in (0, 1)):
        raise SystemExit(f"`tfmem {' '.join(args)}` failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return seconds, cpu, "TORCH=True" in result.stderr, result.stdout


def _plan_answer(stdout: str) -> str:
    """The plan's JSON without its timings (`seconds`), to compare runs."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k != "seconds"}
        return [strip(v) for v in x] if isinstance(x, list) else x

    return json.dumps(strip(json.loads(stdout)), sort_keys=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", choices=("startup", "plan"), help="time only these rows (default: all)")
    parser.add_argument("--tfmem", default=REPO, metavar="PATH", help="the checkout to time (default: this one)")
    options = parser.parse_args()
    checkout = os.path.abspath(options.tfmem)
    names = [] if options.only == "plan" else list(COMMANDS)
    if options.only != "startup":
        names += [PLAN_FIRST, PLAN_AGAIN]
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu_times: dict[str, list[float]] = {name: [] for name in names}
    torch_imported: dict[str, bool] = {}
    answers: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="tfmem-bench-") as tmp:
        warm = os.path.join(tmp, "warm")
        if options.only != "startup":
            answers.add(_plan_answer(run_once(PLAN, checkout, tmp, {"TFMEM_CACHE_DIR": warm})[3]))  # fills the repeated call's cache
        for i in range(options.runs):
            for name in names:
                if name == PLAN_FIRST:
                    args, extra = PLAN, {"TFMEM_CACHE_DIR": os.path.join(tmp, f"empty-{i}")}
                elif name == PLAN_AGAIN:
                    args, extra = PLAN, {"TFMEM_CACHE_DIR": warm}
                else:
                    args, extra = COMMANDS[name], None
                seconds, cpu, imported, out = run_once(args, checkout, tmp, extra)
                times[name].append(seconds)
                cpu_times[name].append(cpu)
                torch_imported[name] = imported
                if args is PLAN:
                    answers.add(_plan_answer(out))
    print(f"tfmem from {checkout}; {os.cpu_count()} CPUs; OMP_NUM_THREADS=1; "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'command':<26} {'median s':>9} {'slowest s':>10} {'median CPU s':>13}  imports torch")
    for name, values in times.items():
        print(f"{name:<26} {statistics.median(values):>9.2f} {max(values):>10.2f} "
              f"{statistics.median(cpu_times[name]):>13.2f}  {'yes' if torch_imported[name] else 'no'}")
    parts = []
    if PLAN_FIRST in times:
        print(f"plan: {' '.join(PLAN)}; its answer was {'the same in every run' if len(answers) == 1 else 'NOT the same in every run'}")
        parts.append(f"tfmem plan (bert-large-uncased 512x32, h100, 8GiB) answers in "
                     f"{statistics.median(times[PLAN_FIRST]):.2f} s on a first call and "
                     f"{statistics.median(times[PLAN_AGAIN]):.2f} s repeated (goal < 5 s)")
    quick = [name for name in names if "--help" in name or "--version" in name]
    if quick:
        parts.append(f"--help / --version / profile --help / estimate --help in "
                     f"{max(statistics.median(times[name]) for name in quick):.2f} s or less (goal < 1.5 s)")
    print(f"Headline: {'; '.join(parts)} (medians of {options.runs})")
    if len(answers) > 1:
        raise SystemExit("the plan's answer changed between runs")


if __name__ == "__main__":
    main()
