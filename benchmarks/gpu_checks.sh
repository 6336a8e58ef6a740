#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one call (for a session that is lent one):
#   bash benchmarks/gpu_checks.sh            # writes its logs under ${OUT:-gpu-results}/
# 1. the tests marked `cuda` (real GradScaler fp16 skipped step in Trainer, compute-capability check,
#    CUDA allocator figures of the profiler);
# 2. the profiler's overhead on CUDA (goal: at most 1% of step time);
# 3. `tfmem profile` of bert-base at sequence length 512 on the GPU;
# 4. the estimator's accuracy against torch.cuda.max_memory_allocated;
# 5. the planner's speed model against measured step times per recipe.
# Record what it prints in the README ("Measured on a GPU").
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"

# The GPU machines have their own PyTorch, transformers and accelerate (CUDA builds) and no network:
# run from the source tree with that python rather than installing anything.
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'" || exit 2
nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv | tee "$out/gpu.txt"

status=0
$PY -m pytest -m cuda -v -p no:cacheprovider 2>&1 | tee "$out/pytest-cuda.txt" || status=1
$PY benchmarks/profiler_overhead.py --device cuda --model bert-base-uncased --batch-size 32 --seq-len 512 --steps 20 2>&1 | tee "$out/profiler-overhead-cuda.txt" || status=1
$PY -m tfmem profile --device cuda --model bert-base-uncased --batch-size 32 --seq-len 512 --output "$out/profile" 2>&1 | tee "$out/profile-cuda.txt" || status=1
$PY benchmarks/estimate_accuracy.py --device cuda 2>&1 | tee "$out/estimate-accuracy-cuda.txt" || status=1
$PY benchmarks/speed_model.py --device cuda --model bert-base-uncased --batch-size 32 --seq-len 512 2>&1 | tee "$out/speed-model-cuda.txt" || status=1
exit $status
