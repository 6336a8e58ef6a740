"""A small on-disk cache of fake-step results: a repeated estimate answers without running its fake steps.

`tfmem plan` is usually run more than once for one model (another budget, another GPU, `--keep`), and
each estimate it makes costs a few fake steps (about 0.15 s each for bert-large on 2 cores) plus the
import of transformers' modeling code they need (1-2 s). An estimate found here costs neither.

What is kept: the step memory an estimate rests on (each phase's peak and split, each module's
activations, the simulated reserved peak, and how the depth was handled), one JSON file per estimate,
named by the SHA-256 of everything that decides it (`key`): the model's configuration and class, the
recipe (every key but its name and description), micro-batch, sequence length, padding, depth
extrapolation, the device profile, and the versions of Python, torch, transformers and tfmem's own source
(a hash of its files, so an edited checkout never reads an answer an older one wrote). The figures are
the ones the fake steps gave; nothing is rounded, so a cached estimate is the same estimate.

Where: `$TFMEM_CACHE_DIR`, else `$XDG_CACHE_HOME/tfmem`, else `~/.cache/tfmem`; `TFMEM_CACHE=0` (or
`off`, `no`, `false`) turns it off. Entries are written atomically (tfmem/files.py). An entry that cannot
be read, or does not hold what its key says, is ignored and written again; a cache that cannot be written
costs later calls their speed, never an answer (one warning per process says so).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tfmem.estimate.fake_step import PhasePeak, StepMemory
from tfmem.files import write_text_atomic
from tfmem.profiler.live_bytes import CATEGORIES

logger = logging.getLogger(__name__)

FORMAT = 1  # bump when what an entry holds changes
OFF_VALUES = ("0", "off", "no", "false")
_warned_unwritable = False


def cache_dir(environ: Mapping[str, str] | None = None) -> Path | None:
    """The folder estimates are kept in, or None when `TFMEM_CACHE` turns the cache off.

    Args:
        environ: the environment to read (default `os.environ`).

    Example:
        >>> str(cache_dir({"XDG_CACHE_HOME": "/var/cache"})), str(cache_dir({"TFMEM_CACHE_DIR": "/tmp/est"}))
        ('/var/cache/tfmem', '/tmp/est')
        >>> cache_dir({"TFMEM_CACHE": "off", "TFMEM_CACHE_DIR": "/tmp/est"}) is None
        True
    """
    env = os.environ if environ is None else environ
    if env.get("TFMEM_CACHE", "").strip().lower() in OFF_VALUES:
        return None
    if override := env.get("TFMEM_CACHE_DIR"):
        return Path(override).expanduser()
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tfmem"


def key(config: Any, model_class: type | None, recipe: Any, micro_batch_size: int, seq_len: int, profile: Any,
        padded: bool, extrapolate_depth: bool) -> dict[str, Any]:
    """Everything that decides an estimate's step memory, as plain JSON data (see the module docstring)."""
    import dataclasses

    import torch
    import transformers

    recipe_data = {k: v for k, v in recipe.to_dict().items() if k not in ("name", "description")}
    material = {
        "format": FORMAT,
        "config": config.to_dict(),
        "model_class": None if model_class is None else f"{model_class.__module__}.{model_class.__qualname__}",
        "recipe": recipe_data,
        "micro_batch_size": micro_batch_size,
        "seq_len": seq_len,
        "padded": padded,
        "extrapolate_depth": extrapolate_depth,
        "device": dataclasses.asdict(profile),
        "versions": {"python": list(sys.version_info[:2]), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tfmem": source_fingerprint()},
    }
    # A JSON round trip: tuples become lists, dtypes their names; what is compared on reading is what was written.
    return json.loads(json.dumps(material, sort_keys=True, default=repr))


def load(material: dict[str, Any]) -> tuple[StepMemory, str] | None:
    """The cached (step memory, method) for `material`, or None (no entry, cache off, or an entry unfit to use).

    The warnings logged while the entry was computed are logged again (see `warnings_kept`).
    """
    path = _path(material)
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        logger.info("tfmem: ignoring the unreadable estimate cache entry %s (%s)", path, e)
        return None
    try:
        entry = json.loads(text)
        if entry["key"] != material:
            raise ValueError("it was written for another estimate")
        step, method = _step_from(entry["step"]), _text(entry["method"])
        warned = [(_text(name), _bytes(level), _text(message)) for name, level, message in entry["warnings"]]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        logger.info("tfmem: ignoring the estimate cache entry %s (%s); estimating again", path, e or type(e).__name__)
        return None
    for name, level, message in warned:
        logging.getLogger(name).log(level, "%s", message)
    return step, method


def store(material: dict[str, Any], step: StepMemory, method: str, warned: Sequence[tuple[str, int, str]] = ()) -> None:
    """Keep (step, method) for `material`, and the warnings its computation logged (`warnings_kept`); a cache
    that cannot be written is warned about once, never raised."""
    global _warned_unwritable
    path = _path(material)
    if path is None:
        return
    entry = {"key": material, "method": method, "warnings": [list(w) for w in warned], "step": {
        "phases": {name: {"peak_bytes": p.peak_bytes, "breakdown": dict(p.breakdown)} for name, p in step.phases.items()},
        "per_module": dict(step.per_module),
        "reserved_bytes": step.reserved_bytes,
        "num_layers": step.num_layers,
    }}
    try:
        write_text_atomic(path, json.dumps(entry, indent=1))
    except OSError as e:
        if not _warned_unwritable:
            _warned_unwritable = True
            logger.warning("tfmem: cannot write the estimate cache in %s (%s); estimates are not kept. Set "
                           "TFMEM_CACHE_DIR to a writable folder, or TFMEM_CACHE=0 to turn the cache off.",
                           path.parent.parent, e.strerror or e)


@contextlib.contextmanager
def warnings_kept() -> Iterator[list[tuple[str, int, str]]]:
    """The warnings tfmem's loggers log inside the block, as (logger, level, message), to keep with an entry:
    an estimate read from the cache says what the computed one said (a model estimated with eager attention
    because it has no sdpa, say)."""
    warned: list[tuple[str, int, str]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warned.append((record.name, record.levelno, record.getMessage()))

    handler = Keep(logging.WARNING)
    tfmem_logger = logging.getLogger("tfmem")
    tfmem_logger.addHandler(handler)
    try:
        yield warned
    finally:
        tfmem_logger.removeHandler(handler)


@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """A hash of tfmem's Python source: any change to the code that estimates makes every entry stale."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*.py")):
        digest.update(str(file.relative_to(root)).encode())
        digest.update(b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def _path(material: dict[str, Any]) -> Path | None:
    folder = cache_dir()
    if folder is None:
        return None
    name = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    return folder / "estimates" / f"{name}.json"


def _step_from(data: dict[str, Any]) -> StepMemory:
    phases = {_text(name): PhasePeak(_bytes(p["peak_bytes"]), {_text(c): _bytes(v) for c, v in p["breakdown"].items()})
              for name, p in data["phases"].items()}
    if not phases:
        raise ValueError("it has no phases")
    if any(set(p.breakdown) != set(CATEGORIES) for p in phases.values()):
        raise ValueError(f"a phase's split is not {', '.join(CATEGORIES)}")
    reserved = data["reserved_bytes"]
    return StepMemory(phases, {_text(m): _bytes(v) for m, v in data["per_module"].items()},
                      None if reserved is None else _bytes(reserved), _bytes(data["num_layers"]))


def _bytes(value: Any) -> int:
    # Any whole number: the split of an extrapolated phase is a difference of fake steps' figures.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{value!r} is not a byte count")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not text")
    return value
