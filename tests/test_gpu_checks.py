"""benchmarks/gpu_checks.sh, rehearsed on the CPU: a GPU call is rare and short, so its plumbing is proven here.

The rehearsal (GPU_CHECKS_REHEARSAL=1) runs the script's blocks with CPU and tiny sizes. All of them take
about 2 minutes on 2 cores, too long for the suite: these tests run the fast blocks (the carried wheels,
the speed grid and the speed model scored on it: a block that reads another's file) and check every block's
log name statically. `GPU_CHECKS_TEST_BLOCKS=all pytest tests/test_gpu_checks.py` rehearses every block.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_checks.sh"
# The device tool returns at most 8 files: these are the script's, and no others.
FILES = {"gpu.txt", "pytest-cuda.txt", "profile-isolation.txt", "estimate-accuracy-cuda.txt", "plan-measure.txt",
         "speed-grid.json", "speed-model.txt", "summary.txt"}
BLOCKS = ["wheels", "gpu", "pytest-cuda", "profile-isolation", "estimate-accuracy", "plan-measure", "speed-grid",
          "speed-model", "optimizer-state"]
FAST = "wheels speed-grid speed-model"


def rehearse(out: Path, only: str, wheels: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_CHECKS_REHEARSAL": "1", "OUT": str(out), "PYTHON": sys.executable,
           "GPU_CHECKS_WHEELS": str(wheels), "OMP_NUM_THREADS": "1"}
    env["GPU_CHECKS_ONLY"] = "" if only == "all" else only
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def summary_lines(out: Path) -> dict[str, str]:
    lines = (out / "summary.txt").read_text().splitlines()
    by_block = {}
    for line in lines:
        name = line.split(" ", 1)[0]
        if name in BLOCKS:
            assert name not in by_block, f"two summary lines for {name}"
            by_block[name] = line
    return by_block


def test_every_block_logs_into_one_of_the_8_files():
    # Statically, so a block that is not rehearsed here is checked too: `block NAME LOG LIMIT CMD...`.
    script = SCRIPT.read_text()
    blocks = re.findall(r"^\s*block ([\w-]+) (\S+) (\d+) ", script, flags=re.M)
    assert {name for name, _, _ in blocks} == set(BLOCKS) - {"wheels"}
    assert {log for _, log, _ in blocks} <= FILES
    assert {m for m in re.findall(r'"\$out/([\w.-]+)"', script)} <= FILES  # files written outside `block` too


def test_the_rehearsal_runs_its_blocks_and_writes_only_the_8_files(tmp_path):
    only = os.environ.get("GPU_CHECKS_TEST_BLOCKS", FAST)
    out, no_wheels = tmp_path / "out", tmp_path / "no-wheels"
    no_wheels.mkdir()
    done = rehearse(out, only, no_wheels)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert written <= FILES and len(written) <= 8, written
    lines = summary_lines(out)
    assert list(lines) == BLOCKS, "one summary line per block, in the script's order"
    ran = BLOCKS if only == "all" else only.split()
    for name, line in lines.items():
        if name in ran:
            assert re.match(rf"{name}\s+exit\s+0\s", line), line
        else:
            assert "not selected" in line, line
    last = (out / "summary.txt").read_text().splitlines()[-1]
    assert re.match(r"gpu_checks: \d+s in all, exit 0; \d file\(s\) in ", last), last
    if "speed-model" in ran:  # it scored the grid that the speed-grid block wrote
        assert re.search(r"speed-model\s+exit\s+0\s.*largest ratio error", lines["speed-model"])


def _broken_datasets_wheel(folder: Path) -> Path:
    """A wheel whose `datasets` installs but fails to import with an error other than ImportError."""
    folder.mkdir()
    wheel = folder / "datasets-0.0.1-py3-none-any.whl"
    info = "datasets-0.0.1.dist-info"
    files = {"datasets/__init__.py": "raise RuntimeError('a broken install')\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: datasets\nVersion: 0.0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in {**files, f"{info}/RECORD": record}.items():
            z.writestr(name, text)
    return wheel


def test_carried_wheels_that_break_the_import_are_dropped_and_said_so(tmp_path):
    # pytest's importorskip catches only ImportError: a `datasets` that raises anything else would break the
    # collection of every test module that asks for it, so the script must not keep such an install.
    wheels = tmp_path / "wheels"
    _broken_datasets_wheel(wheels)
    out = tmp_path / "out"
    done = rehearse(out, "wheels gpu", wheels)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    lines = summary_lines(out)
    assert re.match(r"wheels\s+exit\s+1\s.*carried wheels DROPPED", lines["wheels"]), lines["wheels"]
    # The blocks after it ran without the broken install on their path.
    assert re.match(r"gpu\s+exit\s+0\s", lines["gpu"]), lines["gpu"]
    origin = re.search(r"datasets: (\S+)", lines["gpu"]).group(1)
    assert "/site/" not in origin, origin
    assert "RuntimeError: a broken install" in (out / "gpu.txt").read_text()
