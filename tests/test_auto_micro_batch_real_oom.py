"""auto_micro_batch recovers from a *real* out-of-memory on the CPU, through the Trainer.

The other auto_micro_batch tests simulate the out-of-memory (the profiler's `LiveBytes` raises
`torch.OutOfMemoryError`). A real one on a CPU is a plain `RuntimeError` from the CPU allocator
("DefaultCPUAllocator: can't allocate memory"), which the splitter once let through. Here a child
process caps its own address space (RLIMIT_AS) between what a micro-batch of 4 rows and one of 8 rows
add to it, then trains.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("datasets", reason="the GPU machines may lack `datasets`")
if not sys.platform.startswith("linux"):
    pytest.skip("reads /proc/self/status and relies on Linux's RLIMIT_AS", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent

CHILD = r'''
import gc, json, resource, sys
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
from tfmem import Recipe
from tfmem.errors import is_out_of_memory

torch.set_num_threads(1)
ROWS, SEQ = 8, 1024  # eager attention keeps 4 heads x 1024 x 1024 floats (16 MiB) per row: activations dominate


def address_space(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024


torch.manual_seed(0)
config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                    max_position_embeddings=SEQ, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    attn_implementation="eager")
model = BertForSequenceClassification(config)
g = torch.Generator().manual_seed(1)
data = {"input_ids": torch.randint(5, 128, (2 * ROWS, SEQ), generator=g).tolist(),
        "attention_mask": [[1] * SEQ] * (2 * ROWS), "labels": [i % 2 for i in range(2 * ROWS)]}
args = TrainingArguments(output_dir=sys.argv[1], use_cpu=True, report_to=[], per_device_train_batch_size=ROWS,
                         max_steps=2, save_strategy="no", logging_strategy="no", disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict(data))
Recipe.from_dict({"name": "auto", "auto_micro_batch": True}).apply(trainer)


def step(rows):
    batch = {k: torch.tensor(v[:rows]) for k, v in data.items()}
    model(**batch).loss.backward()


# What a half micro-batch adds to the address space (activations; its gradients stay allocated after).
before = max(address_space("VmSize"), address_space("VmPeak"))
step(ROWS // 2)
model.zero_grad(set_to_none=False)
gc.collect()
half = address_space("VmPeak") - before
base = address_space("VmSize")
assert half > 100 * 2**20, f"the half micro-batch should need a few hundred MiB, it added {half >> 20} MiB"
# Room for 1.5 half micro-batches: the full one (2 halves) cannot fit, a half can.
resource.setrlimit(resource.RLIMIT_AS, (base + half * 3 // 2, resource.RLIM_INFINITY))

try:
    step(ROWS)
    raised = None
except Exception as error:  # what the CPU really raises, checked by the parent
    raised = {"type": type(error).__name__, "torch_oom": isinstance(error, torch.OutOfMemoryError),
              "is_out_of_memory": is_out_of_memory(error), "message": str(error)[:200]}
    del error
model.zero_grad(set_to_none=False)
gc.collect()

trainer.train()
splitter = trainer.tfmem_micro_batch_splitter
print("RESULT " + json.dumps({"raised": raised, "global_step": trainer.state.global_step, "events": splitter.events,
                              "parts": splitter.parts, "loss": trainer.state.log_history[-1].get("train_loss")}))
'''


def test_trainer_recovers_from_the_cpu_allocators_out_of_memory(tmp_path):
    # One malloc arena: extra per-thread arenas each reserve 64 MiB of address space and would blur the limit.
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, env=env,
                            timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-3000:]
    outcome = json.loads(lines[0].removeprefix("RESULT "))

    # The limit produced the real thing: the CPU allocator's plain RuntimeError, not torch.OutOfMemoryError.
    raised = outcome["raised"]
    assert raised is not None, "the limit should make a micro-batch of 8 rows run out of memory"
    assert raised["type"] == "RuntimeError" and not raised["torch_oom"], raised
    assert "can't allocate memory" in raised["message"] or "bad_alloc" in raised["message"], raised
    assert raised["is_out_of_memory"]

    # ...and the Trainer recovered from it: halved once, finished both steps.
    assert outcome["events"] == [{"rows": 8, "parts": 2}], outcome
    assert outcome["parts"] == 2
    assert outcome["global_step"] == 2
    assert outcome["loss"] is not None
    assert "out of memory on a micro-batch of 8 rows; retrying it as 2 x 4" in result.stderr
