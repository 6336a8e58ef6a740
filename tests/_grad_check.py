"""Shared pieces for gradient-exactness tests: float64 tiny models, padded samples, a reference gradient."""

from __future__ import annotations

import copy

import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    TrainerCallback,
)

N_SAMPLES, SEQ, VOCAB = 28, 12, 97
EFFECTIVE_BATCH, STEPS = 16, 4


def _bert_config(**kw):
    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, **kw)


def make_model(task: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if task == "classification":
        model = BertForSequenceClassification(_bert_config(num_labels=3))
    elif task == "masked_lm":
        model = BertForMaskedLM(_bert_config())
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    return model.double()


def make_samples(task: str) -> dict[str, list]:
    """Rows padded to SEQ with random real lengths, so micro-batches differ in real-token counts."""
    g = torch.Generator().manual_seed(1)
    rows = {"idx": [], "input_ids": [], "attention_mask": [], "labels": []}
    for i in range(N_SAMPLES):
        length = int(torch.randint(2, SEQ + 1, (1,), generator=g))
        ids = torch.randint(5, VOCAB, (SEQ,), generator=g)
        ids[length:] = 0
        mask = (torch.arange(SEQ) < length).long()
        if task == "classification":
            labels = int(torch.randint(0, 3, (1,), generator=g))
        elif task == "masked_lm":
            chosen = (torch.rand(SEQ, generator=g) < 0.4) & mask.bool()
            chosen[0] = True  # at least one target per row
            labels = torch.where(chosen, ids, torch.full_like(ids, -100)).tolist()
        else:
            labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100)).tolist()
        rows["idx"].append(i)
        rows["input_ids"].append(ids.tolist())
        rows["attention_mask"].append(mask.tolist())
        rows["labels"].append(labels)
    return rows


def collate(features: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([f[k] for f in features]) for k in features[0]}


def reference_gradient(model: torch.nn.Module, samples: dict[str, list], indices: list[int]) -> dict[str, torch.Tensor]:
    """The gradient of the model's *own* loss over all `indices` as one batch (independent of tfmem)."""
    model = copy.deepcopy(model)
    model.zero_grad()
    batch = collate([{k: samples[k][i] for k in ("input_ids", "attention_mask", "labels")} for i in indices])
    if isinstance(model, GPT2LMHeadModel):
        # transformers' causal loss casts logits to float32; spell out the same mean in float64.
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1]
        torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1)).backward()
    else:
        model(**batch).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert got.keys() == want.keys()
    diff = torch.sqrt(sum(((got[n] - want[n]) ** 2).sum() for n in want))
    norm = torch.sqrt(sum((want[n] ** 2).sum() for n in want))
    return float(diff / norm)


class GradientRecorder(TrainerCallback):
    """Copies the accumulated gradients right before each optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


class RecordingCollator:
    """Collates and remembers which samples each micro-batch held, in order."""

    def __init__(self) -> None:
        self.micro_batches: list[list[int]] = []

    def __call__(self, features):
        self.micro_batches.append([f["idx"] for f in features])
        batch = collate(features)
        del batch["idx"]
        return batch
