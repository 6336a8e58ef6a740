"""What does profiling cost a CPU training step? Plain steps vs the profiler's two windows.

    python benchmarks/profiler_overhead.py                       # tfmem-tiny-bert, batch 16 x 128, 1 thread
    python benchmarks/profiler_overhead.py --model bert-mini --threads 0
    python benchmarks/profiler_overhead.py --device cuda --model bert-base-uncased --seq-len 512

Three ways to run the same baseline training step (forward, backward, AdamW), interleaved step by step
so that load from other processes hits all three alike:

- plain: no profiler.
- speed window: inside `Profiler.step()` after the memory window (what the timed steps of
  `tfmem profile` and of the Trainer callback pay: clock reads and batch counting).
- memory window: on CPU under the `LiveBytes` accounting (every operator goes through a Python
  dispatch mode); on CUDA a `Profiler` whose memory window opens and closes around the step (allocator
  statistics reset and read, the breakdown counted).

On CUDA every mode synchronises the device after the step, so all three clocks read finished work.
On CPU the memory window is never timed (see `tfmem.profiler.session`), so its overhead costs wall time,
not accuracy. Prints a table of median step times; the last line is the memory window's overhead.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tfmem.profiler.batches import micro_batches, synthetic_samples
from tfmem.profiler.live_bytes import LiveBytes
from tfmem.profiler.session import Profiler
from tfmem.zoo import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tfmem-tiny-bert")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="measured steps per mode (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch CPU threads; 0 keeps PyTorch's default")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model, _ = build_model(args.model)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    vocab = model.config.vocab_size
    batch = micro_batches(synthetic_samples(args.batch_size, args.seq_len, vocab), args.batch_size, pad_to=args.seq_len)[0]
    batch = {k: v.to(device) for k, v in batch.items()}
    speed = Profiler(model, optimizer, memory_steps=0, warmup_steps=0)

    def step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def plain() -> None:
        step()

    def speed_window() -> None:
        with speed.step(batch):
            step()

    def memory_window() -> None:
        if device.type == "cuda":
            with Profiler(model, optimizer, memory_steps=1, warmup_steps=1).step(batch):
                step()
            return
        with LiveBytes() as tracker:
            tracker.track(model, optimizer)
            step()

    memory_name = "memory window (allocator)" if device.type == "cuda" else "memory window (LiveBytes)"
    modes = {"plain": plain, "speed window (timed steps)": speed_window, memory_name: memory_window}
    for run in modes.values():  # warm-up: allocator, AdamW state, first-call costs
        run()
        run()
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.steps):
        for name, run in modes.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)

    base = statistics.median(times["plain"])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"{args.model}, batch {args.batch_size} x {args.seq_len}, {where}, median of {args.steps} steps per mode")
    print(f"{'mode':<28} {'step time':>10} {'overhead':>9}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<28} {median * 1000:>8.1f}ms {100 * (median / base - 1):>+8.1f}%")
    if device.type == "cuda":
        timed = statistics.median(times["speed window (timed steps)"])
        print(f"Profiler overhead on CUDA: {100 * (timed / base - 1):+.2f}% step time in timed steps "
              f"({timed * 1000:.1f} ms vs {base * 1000:.1f} ms plain)")
        return
    memory = statistics.median(times[memory_name])
    print(f"LiveBytes accounting overhead: {100 * (memory / base - 1):+.0f}% step time "
          f"({memory * 1000:.0f} ms vs {base * 1000:.0f} ms plain)")


if __name__ == "__main__":
    main()
