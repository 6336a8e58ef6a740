#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one call (for a session that is lent one):
#   bash benchmarks/gpu_checks.sh            # writes its logs under ${OUT:-gpu-results}/
# 1. the tests marked `cuda` (real GradScaler fp16 skipped step in Trainer, compute-capability check,
#    CUDA allocator figures of the profiler);
# 2. the profiler's overhead on CUDA (goal: at most 1% of step time);
# 3. `tfmem profile` of bert-base at sequence length 512 on the GPU;
# 4. the estimator's accuracy against torch.cuda.max_memory_allocated.
# Record what it prints in the README ("Measured on a GPU").
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"

if [ ! -d .venv ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || {
  # The GPU machine needs a CUDA build of torch; the pinned CPU build cannot see the GPU.
  pip install -q --upgrade pip && pip install -q torch && pip install -q -e '.[dev]'
}
python -c "import tfmem" 2>/dev/null || pip install -q -e '.[dev]'
nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv | tee "$out/gpu.txt"

status=0
python -m pytest -m cuda -v -p no:cacheprovider 2>&1 | tee "$out/pytest-cuda.txt" || status=1
python benchmarks/profiler_overhead.py --device cuda --model bert-base-uncased --batch-size 32 --seq-len 512 --steps 20 2>&1 | tee "$out/profiler-overhead-cuda.txt" || status=1
tfmem profile --device cuda --model bert-base-uncased --batch-size 32 --seq-len 512 --output "$out/profile" 2>&1 | tee "$out/profile-cuda.txt" || status=1
python benchmarks/estimate_accuracy.py --device cuda 2>&1 | tee "$out/estimate-accuracy-cuda.txt" || status=1
exit $status
