"""`plan --measure K`: time the K fastest fitting candidates on the real GPU and re-rank by measured time.

The speed model (speed.py) is fitted to one GPU; a plan is only as right as it is on yours. So on a
machine with the target GPU, each of the K fastest recipes that fit by estimate trains a few real steps
(a fresh model of the planned architecture, the recipe applied by `Recipe.prepare_model`, the recipe's
optimizer as a Trainer builds it (AdamW: fused, as on CUDA), gradients clipped at norm 1.0 as the
Trainer's default `max_grad_norm` does, synthetic batches of the planned length, with padding in the
attention mask where the plan estimated padded batches) and is timed between synchronised clocks after
warm-up steps. Its peak *reserved* memory (`torch.cuda.max_memory_reserved`,
the figure the budget is about) plus the plan's CUDA-context overhead is checked against the budget.

Each candidate runs in its own Python process (`python -m tfmem.estimate.measure`): the CUDA caching
allocator's state and whatever an earlier candidate left behind cannot change the next one's peak, and
an out-of-memory error ends only that process. A process that runs past `TIMEOUT_S` is killed and its
candidate reported as timed out.
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tfmem.estimate.plan import Candidate, Plan

logger = logging.getLogger(__name__)

# One candidate's process: building the model, warm-up and timed steps. Generous (a large model's first
# CUDA steps compile kernels and fill the allocator), but a hung process must not hang `tfmem plan`.
TIMEOUT_S = 600.0
# Trainer's default `max_grad_norm`: the clipping (a norm over every gradient) is part of the step timed.
MAX_GRAD_NORM = 1.0

# (model name, candidate, batch, seq_len) -> {"step_seconds": float, "reserved_bytes": int} or {"error": str}
Runner = Callable[[str, Candidate, int, int], dict[str, Any]]


@dataclass(frozen=True)
class Measurement:
    """One candidate timed on the GPU.

    Attributes:
        candidate: the planned candidate (its predicted figures included).
        step_seconds: measured median seconds per optimizer step; None when it did not run.
        reserved_bytes: measured peak reserved by PyTorch's caching allocator; None when it did not run.
        needed_bytes: reserved_bytes plus the plan's overhead (CUDA context), as the budget counts it.
        fits: needed_bytes is within the budget (False when it did not run).
        error: why it did not run (out of memory, ...), else None.
    """

    candidate: Candidate
    step_seconds: float | None
    reserved_bytes: int | None
    needed_bytes: int | None
    fits: bool
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.candidate.recipe.summary(), "micro_batch_size": self.candidate.estimate.micro_batch_size,
                "predicted_step_seconds": self.candidate.step_seconds, "step_seconds": self.step_seconds,
                "predicted_reserved_bytes": self.candidate.estimate.reserved_bytes,
                "reserved_bytes": self.reserved_bytes, "needed_bytes": self.needed_bytes, "fits": self.fits,
                "error": self.error}


def gpu_problem(capability: tuple[int, int] | None) -> str | None:
    """Why this machine cannot measure for a GPU of `capability` (None: any CUDA GPU will do); None if it can."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    here = torch.cuda.get_device_capability()
    if capability is not None and tuple(here) != tuple(capability):
        return (f"this machine's {torch.cuda.get_device_name()} has compute capability {here[0]}.{here[1]}, "
                f"the plan is for {capability[0]}.{capability[1]}")
    return None


def measure(plan: Plan, k: int, run: Runner | None = None,
            progress: Callable[[int, int, Candidate], None] | None = None) -> list[Measurement]:
    """Time the `k` fastest fitting candidates of `plan` and return them re-ranked: those that fit when
    measured first, fastest measured first; then those that did not fit or did not run.

    Args:
        plan: a plan (its `fitting` list, best first, is where candidates come from).
        k: how many to time.
        run: runs one candidate (default: `run_in_subprocess`); tests inject a fake.
        progress: called as `(index from 1, how many, candidate)` before each candidate runs (the CLI shows it).
    """
    if run is None:  # padded batches are the runner's default: only packed text needs saying
        run = run_in_subprocess if plan.padded else functools.partial(run_in_subprocess, padded=False)
    out = []
    chosen = plan.fitting[:k]
    for index, c in enumerate(chosen, 1):
        if progress is not None:
            progress(index, len(chosen), c)
        result = run(plan.model, c, plan.batch_size, plan.seq_len)
        if "error" in result:
            out.append(Measurement(c, None, None, None, False, result["error"]))
            continue
        needed = result["reserved_bytes"] + plan.overhead_bytes
        out.append(Measurement(c, result["step_seconds"], result["reserved_bytes"], needed, needed <= plan.budget_bytes))
    return sorted(out, key=lambda m: (not m.fits, m.step_seconds if m.step_seconds is not None else float("inf")))


def run_in_subprocess(model: str, candidate: Candidate, batch_size: int, seq_len: int,
                      steps: int = 3, warmup: int = 2, *, padded: bool = True,
                      timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
    """Time one candidate in a fresh Python process (see the module docstring); {"error": ...} when it
    fails or runs past `timeout_s` (the process is then killed)."""
    job = {"model": model, "recipe": candidate.recipe.to_dict(), "batch_size": batch_size, "seq_len": seq_len,
           "steps": steps, "warmup": warmup, "tf32": candidate.tf32, "padded": padded}
    try:
        done = subprocess.run([sys.executable, "-m", "tfmem.estimate.measure", json.dumps(job)],
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:g} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {last[:200]}"}
    return json.loads(lines[-1])


def time_steps(model_name: str, recipe_data: dict[str, Any], batch_size: int, seq_len: int, steps: int,
               warmup: int, tf32: bool = False, device: str = "cuda", padded: bool = True) -> dict[str, Any]:
    """Train `warmup` + `steps` optimizer steps of a fresh model; median step time and peak reserved.

    `padded`: batches as `tfmem profile` makes them (between half and all of `seq_len` real tokens, the
    rest padding in the attention mask), the default the planner estimates; False: every token real.
    Returns also the optimizer's class and the share of padding, so a reader can see what was timed.
    `device="cpu"` runs the same loop without the CUDA figures (reserved_bytes None), for tests."""
    import statistics
    import time

    import torch

    from tfmem.errors import is_out_of_memory
    from tfmem.profiler.batches import micro_batches, synthetic_samples, zero_labels
    from tfmem.recipe import Recipe
    from tfmem.techniques.precision import autocast_dtype
    from tfmem.zoo import build_model

    recipe = Recipe.from_dict(recipe_data)
    cuda = device == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = tf32

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    try:
        model = build_model(model_name)[0].to(device)
        recipe.prepare_model(model)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        if recipe.optimizer.name == "adamw":
            opt = torch.optim.AdamW(params, lr=1e-5, fused=cuda)  # fused: what a Trainer uses on CUDA
        else:  # as the Trainer builds it (adamw-8bit keeps the embeddings' state 32-bit: give the model)
            opt = recipe.create_optimizer(model, lr=1e-5)
        cast = autocast_dtype(recipe.mixed_precision)
        scaler = torch.amp.GradScaler(device, enabled=cuda and recipe.mixed_precision == "fp16")
        accumulation = recipe.gradient_accumulation_steps
        micro = batch_size // accumulation
        vocab = model.config.vocab_size
        num_labels, problem_type = model.config.num_labels, model.config.problem_type  # the labels its head reads
        if padded:
            samples = synthetic_samples(micro, seq_len, vocab, num_labels, problem_type=problem_type)
            cpu_batch = micro_batches(samples, micro, pad_to=seq_len)[0]
        else:
            cpu_batch = {"input_ids": torch.randint(0, vocab, (micro, seq_len)),
                         "attention_mask": torch.ones(micro, seq_len, dtype=torch.long),
                         "labels": zero_labels(micro, num_labels, problem_type)}
        batch = {k: v.to(device) for k, v in cpu_batch.items()}
        times = []
        for i in range(warmup + steps):
            if i == warmup and cuda:
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            for _ in range(accumulation):
                with torch.autocast(device, dtype=cast or torch.bfloat16, enabled=cast is not None):
                    loss = model(**batch).loss / accumulation
                scaler.scale(loss).backward()
            scaler.unscale_(opt)  # clip the true gradients, as the Trainer does (a no-op without fp16)
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        return {"step_seconds": statistics.median(times),
                "reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
                "optimizer": type(opt).__name__,
                "padding_fraction": round(1 - float(cpu_batch["attention_mask"].float().mean()), 4)}
    except Exception as e:  # noqa: BLE001 - an out-of-memory is a result, anything else is reported too
        if is_out_of_memory(e):
            return {"error": "out of memory"}
        raise


if __name__ == "__main__":  # one candidate, in its own process (run_in_subprocess)
    logging.basicConfig(level=logging.WARNING)
    job = json.loads(sys.argv[1])
    print(json.dumps(time_steps(job["model"], job["recipe"], job["batch_size"], job["seq_len"], job["steps"],
                                job["warmup"], job.get("tf32", False), padded=job.get("padded", True))))
