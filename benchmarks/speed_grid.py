"""Measure a grid of step times and peaks: models x precisions x checkpointing x micro-batch, on one GPU.

    python benchmarks/speed_grid.py --output speed-grid.json                  # the full grid, ~2 min on an H200
    python benchmarks/speed_grid.py --device cpu --quick --output /tmp/g.json # a dry run of the script

Writes the format of ../shared/gpu-runs/2026-11-26-h200/speed-grid.json (so `benchmarks/speed_model.py
--grid FILE` can score it): a list of {"model", "ckpt", "prec", "micro", "step_s", "times", "peak"}, plus
"batch" and "seq_len" (that file has none: it is 32 x 512), where `times` are the per-step seconds (one
warm-up, then the timed steps), `step_s` the median of the timed ones and `peak`
`torch.cuda.max_memory_allocated()` over them (None on CPU).

Each point is a plain PyTorch loop, as in that file: `AutoModelForSequenceClassification.from_config`,
effective batch 32 at sequence 512 split into micro-batches (the loss scaled by micro/32), fused AdamW,
precision fp32 / tf32 (`torch.backends.cuda.matmul.allow_tf32`) / bf16 / fp16 autocast (GradScaler for
fp16), checkpointing off or on (tfmem's own, through a recipe's `prepare_model`). The device is
synchronised around every timed step. `--time-limit` stops starting new points once exceeded (what was
measured is still written, and the last line says how many points were skipped).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from tfmem.files import write_text_atomic
from tfmem.recipe import Recipe
from tfmem.zoo import model_config

MODELS = {"bert-base": "bert-base-uncased", "bert-large": "bert-large-uncased"}
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
MICROS = (8, 16, 32)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_point(model, device: str, prec: str, micro: int, batch: int, seq_len: int, vocab: int,
                  warmup: int, timed: int) -> dict:
    """Step times and the peak of one (precision, micro-batch) point on an already built model."""
    torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
    cast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                  fused=device == "cuda" or None)
    scaler = torch.amp.GradScaler(device) if prec == "fp16" else None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g).to(device)
    labels = torch.randint(0, 2, (batch,), generator=g).to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(warmup + timed):
        _sync(device)
        t0 = time.perf_counter()
        for start in range(0, batch, micro):
            with torch.autocast(device, dtype=cast or torch.bfloat16, enabled=cast is not None):
                loss = model(input_ids=ids[start:start + micro], labels=labels[start:start + micro]).loss
            loss = loss * (micro / batch)
            (scaler.scale(loss) if scaler else loss).backward()
            del loss
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    del optimizer, scaler
    torch.backends.cuda.matmul.allow_tf32 = False
    return {"step_s": statistics.median(times[warmup:]), "times": [round(t, 4) for t in times], "peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--output", required=True, help="the JSON file to write")
    parser.add_argument("--quick", action="store_true", help="bert-tiny, batch 8 x 32 tokens, micro 2/4/8: a dry run")
    parser.add_argument("--time-limit", type=float, default=240.0, help="seconds; no new point starts after (default 240)")
    parser.add_argument("--timed-steps", type=int, default=3)
    # The H200 grid's fp32/tf32 steps agreed within 2%, its bf16/fp16 steps spread by up to 50% (launch-bound:
    # host jitter), and 3 of those were too few to order bf16 against fp16 (issue 7.2): give 16-bit rows more.
    parser.add_argument("--timed-steps-16bit", type=int, default=None,
                        help="timed steps of bf16/fp16 points (default: --timed-steps)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here (use --device cpu --quick for a dry run).")
    if args.quick:
        models, batch, seq_len, micros = {"bert-tiny": "bert-tiny"}, 8, 32, (2, 4, 8)
    else:
        models, batch, seq_len, micros = MODELS, 32, 512, MICROS
    timed_16 = args.timed_steps if args.timed_steps_16bit is None else args.timed_steps_16bit
    if min(args.timed_steps, timed_16) < 1:
        raise SystemExit(f"--timed-steps {args.timed_steps} / --timed-steps-16bit {timed_16}: each must be at least 1.")
    precisions = [p for p in PRECISIONS if args.device == "cuda" or p in ("fp32", "bf16")]
    from transformers import AutoModelForSequenceClassification

    started = time.perf_counter()
    points, skipped = [], 0
    print(f"{'model':11} {'ckpt':>5} {'prec':>5} {'micro':>5} {'step ms':>8} {'peak GiB':>9}")
    for short, name in models.items():
        for ckpt in (False, True):
            if time.perf_counter() - started > args.time_limit:
                skipped += len(precisions) * len(micros)
                continue
            config = model_config(name)
            torch.manual_seed(0)
            with torch.device(args.device):
                model = AutoModelForSequenceClassification.from_config(config)
            Recipe(name="grid").replace(gradient_checkpointing=ckpt).prepare_model(model)
            model.train()
            for prec in precisions:
                for micro in micros:
                    if time.perf_counter() - started > args.time_limit:
                        skipped += 1
                        continue
                    # batch and seq_len in every point: benchmarks/speed_model.py --grid reads them (the quick grid
                    # is not the H200's 32 x 512)
                    point = {"model": short, "ckpt": ckpt, "prec": prec, "micro": micro, "batch": batch,
                             "seq_len": seq_len}
                    point.update(measure_point(model, args.device, prec, micro, batch, seq_len, config.vocab_size,
                                               warmup=1, timed=timed_16 if prec in ("bf16", "fp16") else args.timed_steps))
                    points.append(point)
                    peak = f"{point['peak'] / 2**30:9.2f}" if point["peak"] is not None else f"{'-':>9}"
                    print(f"{short:11} {str(ckpt):>5} {prec:>5} {micro:>5} {point['step_s'] * 1000:8.1f} {peak}", flush=True)
            del model
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    write_text_atomic(Path(args.output), json.dumps(points, indent=1) + "\n")
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"speed grid: {len(points)} points on {device} in {time.perf_counter() - started:.0f} s, "
          f"{skipped} skipped by --time-limit; wrote {args.output}")


if __name__ == "__main__":
    main()
