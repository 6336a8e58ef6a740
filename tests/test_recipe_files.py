"""Every bad recipe input gives a `RecipeError` naming the field or file, quickly, with a short message.

These are the failures a fuzzing trial found (issue 9): alias bombs, huge files, other encodings, deep
nesting, odd paths, duplicate keys, YAML 1.1 quirks, absurd numbers, unprintable names, and `Recipe(...)`
built directly with wrong types. Each test would hang, raise a raw exception or pass silently without its
protection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal

import pytest

from tfmem import Recipe, RecipeError
from tfmem.cli import main
from tfmem.recipe_file import MAX_RECIPE_BYTES
from tfmem.techniques.accumulation import AccumulationConfig
from tfmem.techniques.freezing import FreezeConfig

MESSAGE_CHARS = 1000  # a message with every problem of a bad file stays well under this


@contextlib.contextmanager
def answers_within(seconds: float = 5.0):
    """Turn a hang into a test failure (not a timing check: the protections answer in milliseconds)."""

    def hung(signum, frame):
        raise AssertionError(f"no answer within {seconds} s: the input hangs tfmem")

    old = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def refused(load, *args, match: str) -> RecipeError:
    with answers_within(), pytest.raises(RecipeError, match=match) as info:
        load(*args)
    assert len(str(info.value)) < MESSAGE_CHARS, str(info.value)[:2000]
    return info.value


def write(tmp_path, text: str | bytes, name: str = "r.yaml"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


ALIAS_BOMB = "name: bomb\nfreeze:\n  layers: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"  l{i}: &a{i} [{', '.join(f'*a{i - 1}' for _ in range(9))}]\n" for i in range(1, 10)
)


def shared_reference_bomb(levels: int = 9):
    """The structure ALIAS_BOMB expands to: 9**9 leaves, built from 9 lists that share references."""
    item: list = ["x"] * 9
    for _ in range(levels):
        item = [item] * 9
    return item


# -- alias bombs and bounded messages ---------------------------------------------------------------


def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    error = refused(Recipe.from_yaml, write(tmp_path, ALIAS_BOMB), match=r"anchors and aliases .* not allowed.*line 3")
    assert "r.yaml" in str(error)


def test_a_single_alias_is_refused_too(tmp_path):
    refused(Recipe.from_yaml, write(tmp_path, "name: &n x\ndescription: *n\n"), match="anchors and aliases")


def test_expanded_bomb_in_from_dict_gives_a_short_message():
    error = refused(Recipe.from_dict, {"name": "bomb", "freeze": {"layers": shared_reference_bomb()}},
                    match=r"`freeze.layers` must be int, got \[\[\[")
    assert "…" in str(error) or "..." in str(error)
    refused(Recipe.from_dict, {"name": "bomb", "freeze": shared_reference_bomb()}, match=r"`freeze` must be a mapping")
    refused(Recipe.from_dict, {"name": shared_reference_bomb()}, match=r"`name` must be str")


def test_cli_shows_the_alias_bomb_as_one_clean_error(tmp_path, capsys):
    with answers_within():
        assert main(["recipes", str(write(tmp_path, ALIAS_BOMB))]) == 2
    err = capsys.readouterr().err
    assert "tfmem recipes: error: Invalid recipe in" in err and "anchors and aliases" in err
    assert "Traceback" not in err and len(err) < MESSAGE_CHARS


def test_quoted_values_are_bounded():
    error = refused(Recipe.from_dict, {"name": "x", "mixed_precision": "b" * 100_000}, match="mixed_precision")
    assert "…" in str(error) or "..." in str(error)
    refused(Recipe.from_dict, {"name": "x", "gradient_accumulation_steps": 10**10_000},
            match=r"is <an integer of about 10001 digits>")


def test_many_unknown_keys_are_counted_not_listed():
    error = refused(Recipe.from_dict, {"name": "x", **{f"key{i}": 1 for i in range(100_000)}},
                    match=r"and 99990 more unknown keys")
    assert len(error.problems) == 11


# -- the file itself --------------------------------------------------------------------------------


def test_large_file_is_refused_naming_its_size_and_the_cap(tmp_path):
    text = "name: big\n" + "".join(f"unknown_key_{i}: {i}\n" for i in range(100_000))
    path = write(tmp_path, text)
    refused(Recipe.from_yaml, path, match=r"r.yaml: the file is \d+\.\d MiB, larger than a recipe file may be \(64 KiB\)")
    assert MAX_RECIPE_BYTES == 64 * 1024


@pytest.mark.parametrize(
    "text",
    ["name: x\nfreeze: {layers: [" + ",".join(["1"] * 30_000) + "]}\n", "name: x\n" + "".join(f"k{i}: {i}\n" for i in range(5000))],
    ids=["long-list", "many-keys"],
)
def test_files_with_thousands_of_values_are_refused_before_they_are_built(tmp_path, text):
    assert len(text) < MAX_RECIPE_BYTES
    refused(Recipe.from_yaml, write(tmp_path, text), match=r"more than 1000 keys and values \(at line \d+\)")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ("name: café\n".encode("latin-1"), r"not UTF-8 text \(byte b'\\xe9' at offset 9"),
        ("name: café\n".encode("utf-16"), r"UTF-16 \(little-endian\), not UTF-8"),
        ("name: café\n".encode("utf-16-be"), r"UTF-16 or UTF-32 \(a fifth or more of its bytes are NUL\), not UTF-8"),
        ("name: café\n".encode("utf-32"), r"UTF-32 \(little-endian\), not UTF-8"),
        (random.Random(0).randbytes(4000), r"not UTF-8 text"),
        (b"name: x\n\x00\n", r"binary data \(it holds NUL bytes\), not UTF-8"),
    ],
    ids=["latin-1", "utf-16", "utf-16-be-no-bom", "utf-32", "random-bytes", "nul"],
)
def test_files_that_are_not_utf8_say_so(tmp_path, data, match):
    error = refused(Recipe.from_yaml, write(tmp_path, data), match=match)
    assert "r.yaml" in str(error) and "must be UTF-8" in str(error)


def test_a_utf8_byte_order_mark_is_fine(tmp_path):
    assert Recipe.from_yaml(write(tmp_path, "\ufeffname: bom\n")).name == "bom"


def test_paths_that_are_not_regular_files_are_refused(tmp_path):
    refused(Recipe.from_yaml, tmp_path, match=r"the path is a directory")
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)
    refused(Recipe.from_yaml, loop, match=r"symbolic link that loops")
    refused(Recipe.load, str(loop), match=r"symbolic link that loops")
    zero = tmp_path / "zero.yaml"
    zero.symlink_to("/dev/zero")
    refused(Recipe.from_yaml, zero, match=r"the path is a device")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    refused(Recipe.from_yaml, fifo, match=r"named pipe")
    refused(Recipe.from_json, fifo, match=r"named pipe")
    refused(Recipe.from_yaml, tmp_path / "nul\x00.yaml", match=r"NUL character")
    refused(Recipe.load, "a\x00b.yaml", match=r"NUL character")


def test_missing_file_stays_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*tfmem recipes"):
        Recipe.from_yaml(tmp_path / "nope.yaml")


# -- nesting ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [200, 5000])  # below and above libyaml's own limit (1,000)
def test_deep_yaml_nesting_is_refused_before_recursion(tmp_path, depth):
    path = write(tmp_path, "name: deep\nfreeze: " + "[" * depth + "]" * depth + "\n")
    refused(Recipe.from_yaml, path, match=r"more than 16 levels deep \(at line 2")


def test_deep_json_nesting_is_refused_before_recursion(tmp_path):
    path = write(tmp_path, '{"name": "deep", "freeze": ' + "[" * 20_000 + "]" * 20_000 + "}", name="r.json")
    refused(Recipe.from_json, path, match=r"more than 16 levels deep")


def test_deep_and_self_referencing_dicts_are_refused():
    deep: dict = {}
    inner = deep
    for _ in range(20_000):
        inner["layers"] = {}
        inner = inner["layers"]
    refused(Recipe.from_dict, {"name": "deep", "freeze": deep}, match=r"`freeze` is nested more than 16 levels deep")
    loop: dict = {}
    loop["layers"] = loop
    refused(Recipe.from_dict, {"name": "loop", "freeze": loop}, match=r"refers to itself")


# -- values YAML reads surprisingly -----------------------------------------------------------------


def test_explicit_tag_that_cannot_be_read_names_the_line(tmp_path):
    refused(Recipe.from_yaml, write(tmp_path, "name: !!int abc\n"), match=r"not valid YAML at line 1.*cannot read 'abc' as int")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("name: x\ngradient_accumulation_steps: 0\ngradient_accumulation_steps: 4\n", "gradient_accumulation_steps"),
        ("name: x\nfreeze: {layers: 1}\nfreeze: {embeddings: true}\n", "freeze"),
        ("name: x\nfreeze:\n  layers: 1\n  layers: 2\n", "layers"),
    ],
)
def test_duplicate_keys_are_refused_naming_the_key(tmp_path, text, key):
    refused(Recipe.from_yaml, write(tmp_path, text), match=rf"the key `{key}` appears twice in one mapping \(lines")


def test_duplicate_keys_in_json_are_refused(tmp_path):
    path = write(tmp_path, '{"name": "x", "freeze": {"layers": 1, "layers": 2}}', name="r.json")
    refused(Recipe.from_json, path, match=r"the key `layers` appears twice")


def test_base_60_is_not_read_as_a_number(tmp_path):
    refused(Recipe.from_yaml, write(tmp_path, "name: x\ngradient_accumulation_steps: 1:30\n"),
            match=r"`gradient_accumulation_steps` must be int, got '1:30' \(str\) \(tfmem reads YAML 1.2 integers")
    refused(Recipe.from_yaml, write(tmp_path, "name: x\nfreeze: {layers: 1:00}\n"), match=r"`freeze.layers` must be int, got '1:00'")


def test_integers_are_read_as_yaml_12_reads_them(tmp_path):
    recipe = Recipe.from_yaml(write(tmp_path, "name: x\ngradient_accumulation_steps: 010\nfreeze: {layers: 0x2}\n"))
    assert (recipe.gradient_accumulation_steps, recipe.freeze.layers) == (10, 2)
    assert Recipe.from_yaml(write(tmp_path, "name: 1_000\n")).name == "1_000"


@pytest.mark.parametrize("value", [2**64, 10**100, 65_537])
def test_absurd_counts_are_refused_with_the_bound(value, tmp_path):
    refused(Recipe.from_dict, {"name": "x", "gradient_accumulation_steps": value},
            match=r"`gradient_accumulation_steps` is .*; tfmem accepts at most 65536")
    refused(Recipe.from_dict, {"name": "x", "freeze": {"layers": value}}, match=r"`freeze.layers` is .*at most 65536")
    refused(Recipe.from_yaml, write(tmp_path, f"name: x\ngradient_accumulation_steps: {value}\n"),
            match=r"`gradient_accumulation_steps` is .*at most 65536")
    assert Recipe.from_dict({"name": "x", "gradient_accumulation_steps": 65_536}).gradient_accumulation_steps == 65_536


@pytest.mark.parametrize(
    ("name", "what"),
    [("a\x00b", r"the control character '\\x00' at position 1"), ("a\ud800", "a lone surrogate"),
     ("a\nb", r"the control character '\\n'"), ("\x1b[31mred", r"the control character '\\x1b'"),
     ("x" * 201, "201 characters long")],
)
def test_names_must_be_printable_text(name, what):
    refused(Recipe.from_dict, {"name": name}, match=rf"`name` (contains {what}|is {what})")


def test_yaml_escapes_in_names_are_checked_too(tmp_path):
    refused(Recipe.from_yaml, write(tmp_path, 'name: "a\\0b"\n'), match=r"`name` contains the control character")
    refused(Recipe.from_yaml, write(tmp_path, 'name: "\\ud800"\n'), match=r"not valid YAML at line 1.*escape")


# -- Recipe(...) built directly ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"accumulation": 4}, r"`accumulation` must be AccumulationConfig, got 4 \(int\).*gradient_accumulation_steps"),
        ({"freeze": {"layers": 2}}, r"`freeze` must be FreezeConfig, got \{'layers': 2\} \(dict\)"),
        ({"micro_batch": None}, r"`micro_batch` must be AutoMicroBatchConfig, got None"),
        ({"precision": "bf16"}, r"`precision` must be PrecisionConfig"),
        ({"modules": None}, r"`modules` must be ModulePaths"),
    ],
)
def test_recipe_built_directly_checks_types(kwargs, match):
    with pytest.raises(RecipeError, match=match):
        Recipe(**kwargs)


@pytest.mark.parametrize(
    "data",
    [{"name": ""}, {"name": 5}, {"name": "a\x00"}, {"description": 3}, {"description": "x\ny"}, {"name": "x" * 300}],
)
def test_recipe_built_directly_gives_the_same_messages_as_from_dict(data):
    with pytest.raises(RecipeError) as direct:
        Recipe(**data)
    with pytest.raises(RecipeError) as from_dict:
        Recipe.from_dict(data)
    assert direct.value.problems == from_dict.value.problems


def test_recipe_built_directly_from_valid_pieces_equals_from_dict():
    direct = Recipe(name="d", accumulation=AccumulationConfig(4), freeze=FreezeConfig(layers=2))
    assert direct == Recipe.from_dict({"name": "d", "gradient_accumulation_steps": 4, "freeze": {"layers": 2}})
    assert dataclasses.replace(direct, name="e").name == "e"
    with pytest.raises(RecipeError, match="`freeze` must be FreezeConfig"):
        dataclasses.replace(direct, freeze=3)


def test_assigning_to_a_field_says_how_to_derive_a_changed_recipe():
    recipe = Recipe.from_dict({"name": "r"})
    with pytest.raises(dataclasses.FrozenInstanceError, match=r"recipe.replace\(name=\.\.\.\)"):
        recipe.name = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError, match=r"recipe.replace\(gradient_accumulation_steps=\.\.\.\)"):
        recipe.accumulation = AccumulationConfig(8)  # type: ignore[misc]
    with pytest.raises(AttributeError, match=r"recipe.replace"):
        del recipe.name
    with pytest.raises(AttributeError, match=r"cannot assign to `colour`.*`recipe.replace\(<key>=\.\.\.\)` with a recipe key"):
        recipe.colour = "red"  # type: ignore[attr-defined]
    assert recipe.replace(name="other").name == "other" and recipe.name == "r"


# -- the command line -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: write(p, "name: café\n".encode("latin-1")), "must be UTF-8"),
        (lambda p: p, "is a directory"),
        (lambda p: (os.mkfifo(p / "f.yaml"), p / "f.yaml")[1], "named pipe"),
        (lambda p: write(p, "name: !!int abc\n"), "cannot read 'abc' as int"),
        (lambda p: write(p, "name: x\nname: y\n"), "appears twice"),
        (lambda p: write(p, "name: x\nfreeze: " + "{a: " * 3000 + "}" * 3000 + "\n"), "levels deep"),
        (lambda p: write(p, "name: x\ngradient_accumulation_steps: " + "9" * 5000 + "\n"), "cannot read"),
        (lambda p: write(p, json.dumps({"name": "x", "gradient_accumulation_steps": 2**64}), "r.json"), "at most 65536"),
    ],
    ids=["latin-1", "directory", "fifo", "bad-tag", "duplicate", "deep", "huge-int", "json-2**64"],
)
def test_cli_prints_each_bad_file_as_one_clean_error(tmp_path, capsys, make, needle):
    path = make(tmp_path)
    with answers_within():
        assert main(["recipes", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("tfmem recipes: error: ") and needle in captured.err, captured.err[:2000]
    assert "Traceback" not in captured.err and len(captured.err) < MESSAGE_CHARS and not captured.out
