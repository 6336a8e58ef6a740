"""`tfmem plan` shows where its search is, on a terminal only (tfmem/cli/progress.py, SearchStep in search.py)."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from tfmem.cli import main
from tfmem.cli import progress as cli_progress
from tfmem.estimate.plan import plan
from tfmem.estimate.search import SearchStep
from tfmem.estimate.sharding import plan_sharded

PLAN = ["plan", "--device", "cpu", "--model", "bert-tiny", "--batch-size", "2", "--seq-len", "16"]


def test_plan_calls_progress_once_per_estimate_with_a_description():
    steps: list[SearchStep] = []
    # 1 MiB: nothing fits, so every candidate is estimated (on a CPU no two share an estimate).
    result = plan("bert-tiny", 2, 16, 2**20, "cpu", progress=steps.append)
    assert len(steps) == result.estimates_run > 1
    assert [s.index for s in steps] == list(range(1, len(steps) + 1))
    assert all(s.total == len(steps) and not s.exact for s in steps)  # the bound is reached when nothing fits
    assert {s.description for s in steps} >= {"fp32, micro 2", "checkpointing, fp32, micro 1"}
    assert steps[0].text() == f"candidate 1 of at most {len(steps)} ({steps[0].description})"


def test_sharded_plan_names_the_strategy_in_its_progress():
    steps: list[SearchStep] = []
    # (1 MiB would estimate nothing: a bound on the weights and optimizer state refuses every candidate first.)
    plan_sharded("bert-tiny", 2, 16, 2**30, 2, "cpu", strategies=("ddp",), progress=steps.append)
    assert steps and all(s.description.startswith("ddp, ") and s.description.endswith("micro 1") for s in steps)


def test_plan_without_a_terminal_writes_nothing_to_stderr_and_the_same_json(capsys, monkeypatch):
    import tfmem.estimate.plan as plan_module

    given = []

    def spy(*args, **kwargs):
        given.append(kwargs["progress"])
        return plan(*args, **kwargs)

    monkeypatch.setattr(plan_module, "plan", spy)
    assert cli_progress.stderr_console().stderr  # the status goes to stderr, never stdout
    assert main([*PLAN, "--budget", "1GiB", "--json"]) == 0
    plain = capsys.readouterr()
    assert plain.err == ""  # capsys's stderr is no terminal: no status at all,
    assert given == [None]  # and the search is not even asked for its progress

    shown = io.StringIO()
    monkeypatch.setattr(cli_progress, "stderr_console", lambda: Console(file=shown, force_terminal=True))
    assert main([*PLAN, "--budget", "1GiB", "--json"]) == 0
    with_status = capsys.readouterr()
    assert "Planning" in shown.getvalue()  # the status did run, elsewhere than stdout
    # Byte for byte but for the search's own duration.
    assert _without_seconds(with_status.out) == _without_seconds(plain.out)


def _without_seconds(out: str) -> str:
    """The JSON with every "seconds" (how long the search and each estimate took) dropped."""
    def drop(value):
        if isinstance(value, dict):
            return {k: drop(v) for k, v in value.items() if k != "seconds"}
        return [drop(v) for v in value] if isinstance(value, list) else value

    return json.dumps(drop(json.loads(out)))


def test_stdout_stays_stdout_while_the_status_shows(capsys, monkeypatch):
    shown = io.StringIO()
    monkeypatch.setattr(cli_progress, "stderr_console", lambda: Console(file=shown, force_terminal=True))
    with cli_progress.status("Planning") as update:
        update("candidate 1 of at most 2 (fp32, micro 1)")
        print("printed meanwhile")
    assert capsys.readouterr().out == "printed meanwhile\n"
    assert "Planning: candidate 1 of at most 2 (fp32, micro 1)" in shown.getvalue()
    assert "printed meanwhile" not in shown.getvalue()


@pytest.mark.parametrize("extra, label", [(["--budget", "1MiB"], "Planning: candidate 1 of at most "),
                                          (["--budget", "1GiB", "--gpus", "2"], "Planning for 2 GPUs: candidate 1 of at most ")])
def test_plan_on_a_terminal_shows_the_candidate_being_estimated(capsys, monkeypatch, extra, label):
    shown = io.StringIO()
    monkeypatch.setattr(cli_progress, "stderr_console", lambda: Console(file=shown, force_terminal=True, width=200))
    main([*PLAN, *extra])
    text = shown.getvalue()
    assert label in text and "micro 1" in text
    assert "candidate" not in capsys.readouterr().out  # never on stdout


def test_estimate_on_a_terminal_shows_a_status_and_nothing_without_one(capsys, monkeypatch):
    args = ["estimate", "--device", "cpu", "--model", "bert-tiny", "--batch-size", "2", "--seq-len", "16", "--json"]
    assert main(args) == 0
    assert capsys.readouterr().err == ""
    shown = io.StringIO()
    monkeypatch.setattr(cli_progress, "stderr_console", lambda: Console(file=shown, force_terminal=True))
    assert main(args) == 0
    assert "Estimating" in shown.getvalue()


def test_measure_reports_each_candidate_before_it_runs():
    from tfmem.estimate.measure import measure

    p = plan("bert-tiny", 4, 16, 10**12, "cuda", gpu="h100", overhead_bytes=0, verify=False, keep=2)
    calls = []
    measure(p, 2, run=lambda *a: {"step_seconds": 0.1, "reserved_bytes": 1},
            progress=lambda i, n, c: calls.append((i, n, c)))
    assert calls == [(1, 2, p.fitting[0]), (2, 2, p.fitting[1])]
