"""Tiny models of every architecture family tfmem reads, built from configs in code (no downloads).

Shared by the architecture, freezing and checkpointing tests. Every model has dropout off, so two runs
of the same weights on the same batch give the same numbers, and 3 layers, so "freeze the first 2"
leaves one trainable layer. Seeded: `build(family)` twice gives the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import torch
import transformers as tf
from torch import nn

VOCAB = 96
HIDDEN = 32
LAYERS = 3
SEQ = 12

# Tiny models spend their time in thread hand-offs, not arithmetic: on our shared 2-core machines a
# forward/backward takes ~1 s with 2 intra-op threads and ~3 ms with one.

_BERT_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def _bert() -> nn.Module:
    return tf.BertForSequenceClassification(tf.BertConfig(**_BERT_LIKE))


def _roberta() -> nn.Module:
    return tf.RobertaForSequenceClassification(tf.RobertaConfig(**_BERT_LIKE, pad_token_id=1))


def _xlm_roberta() -> nn.Module:
    return tf.XLMRobertaForSequenceClassification(tf.XLMRobertaConfig(**_BERT_LIKE, pad_token_id=1))


def _distilbert() -> nn.Module:
    config = tf.DistilBertConfig(
        vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=2, hidden_dim=64, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0,
    )
    return tf.DistilBertForSequenceClassification(config)


def _albert() -> nn.Module:
    # embedding_size != hidden_size: the factorised embedding with its projection, as in real ALBERT.
    config = tf.AlbertConfig(**_BERT_LIKE, embedding_size=16, classifier_dropout_prob=0.0)
    return tf.AlbertForSequenceClassification(config)


def _electra() -> nn.Module:
    # embedding_size != hidden_size, as in ELECTRA-small: the model gets an `embeddings_project`.
    return tf.ElectraForSequenceClassification(tf.ElectraConfig(**_BERT_LIKE, embedding_size=16))


def _deberta_v2() -> nn.Module:
    config = tf.DebertaV2Config(
        **_BERT_LIKE, relative_attention=True, position_buckets=8, norm_rel_ebd="layer_norm",
        pos_att_type=["p2c", "c2p"], pooler_dropout=0.0,
    )
    return tf.DebertaV2ForSequenceClassification(config)


def _mpnet() -> nn.Module:
    return tf.MPNetForSequenceClassification(tf.MPNetConfig(**_BERT_LIKE))


def _modernbert() -> nn.Module:
    config = tf.ModernBertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, global_attn_every_n_layers=2, local_attention=8,
        pad_token_id=0, bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3,
        attention_dropout=0.0, mlp_dropout=0.0, embedding_dropout=0.0, classifier_dropout=0.0,
    )
    return tf.ModernBertForSequenceClassification(config)


def _gpt2_config() -> tf.GPT2Config:
    return tf.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=2, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )


def _gpt2() -> nn.Module:
    return tf.GPT2ForSequenceClassification(_gpt2_config())


def gpt2_lm() -> nn.Module:
    """GPT-2 with its language-model head tied to the input embeddings (`lm_head.weight is wte.weight`)."""
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(_gpt2_config())


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "bert": _bert,
    "roberta": _roberta,
    "xlm-roberta": _xlm_roberta,
    "distilbert": _distilbert,
    "albert": _albert,
    "electra": _electra,
    "deberta-v2": _deberta_v2,
    "mpnet": _mpnet,
    "modernbert": _modernbert,
    "gpt2": _gpt2,
}

# Where each family keeps its layers, written out by hand to check the introspection against.
LAYER_PATHS = {
    "bert": "bert.encoder.layer",
    "roberta": "roberta.encoder.layer",
    "xlm-roberta": "roberta.encoder.layer",
    "distilbert": "distilbert.transformer.layer",
    "albert": "albert.encoder.albert_layer_groups",
    "electra": "electra.encoder.layer",
    "deberta-v2": "deberta.encoder.layer",
    "mpnet": "mpnet.encoder.layer",
    "modernbert": "model.layers",
    "gpt2": "transformer.h",
}


def build(family: str, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny seeded model of `family` in training mode."""
    torch.manual_seed(0)
    model = FAMILIES[family]().to(dtype)
    model.train()
    return model


def batch(model: nn.Module, *, size: int = 2, seq: int = SEQ) -> dict[str, torch.Tensor]:
    """A seeded classification batch; token ids avoid the pad/special ids 0-3."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(4, VOCAB, (size, seq), generator=generator)
    labels = torch.randint(0, 2, (size,), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


class Custom(nn.Module):
    """An architecture tfmem cannot read: no `get_input_embeddings`, blocks under made-up names."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh()) for _ in range(LAYERS)
        )
        self.head = nn.Linear(HIDDEN, 2)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **_: object) -> SimpleNamespace:
        hidden = self.norm(self.tok(input_ids))
        for block in self.blocks:
            hidden = block(hidden)
        return SimpleNamespace(loss=nn.functional.cross_entropy(self.head(hidden[:, 0]), labels))


@contextmanager
def count_runs(layers: Iterable[nn.Module]) -> Iterator[list[int]]:
    """Count how many times each layer's computation runs (forward plus any recompute in backward).

    Counted on the submodules with parameters inside each layer, not on the layer: its own hooks stay
    outside the checkpoint and run once. A layer's count is its busiest submodule's, because a
    non-reentrant recompute stops as soon as it has rebuilt what backward needs, skipping the last ops.
    """
    layers = list(layers)
    per_module: list[dict[int, int]] = [{} for _ in layers]
    handles = []
    for index, layer in enumerate(layers):
        for sub in layer.modules():
            if any(True for _ in sub.parameters(recurse=False)):
                def hook(module: nn.Module, *_: object, index: int = index) -> None:
                    per_module[index][id(module)] = per_module[index].get(id(module), 0) + 1

                handles.append(sub.register_forward_hook(hook))
    counts: list[int] = [0 for _ in layers]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()
        counts[:] = [max(c.values(), default=0) for c in per_module]


@contextmanager
def saved_inside(modules: Iterable[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Collect the tensors autograd saves for backward while any of `modules` is running its forward.

    Do not nest two of these: only the innermost `saved_tensors_hooks` sees a saved tensor (and inside a
    non-reentrant checkpoint, the checkpoint's own hooks see them instead, so this counts nothing there).
    """
    saved: list[torch.Tensor] = []
    depth = [0]

    def enter(*_: object) -> None:
        depth[0] += 1

    def leave(*_: object) -> None:
        depth[0] -= 1

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if depth[0] > 0:
            saved.append(tensor)
        return tensor

    handles = []
    for module in modules:
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield saved
    finally:
        for handle in handles:
            handle.remove()
