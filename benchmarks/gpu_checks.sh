#!/usr/bin/env bash
# Every check of issue 7 that needs a CUDA GPU, in one call on one GPU, in at most 8 minutes:
#   OUT=/some/dir bash benchmarks/gpu_checks.sh        # logs under $OUT (default gpu-results/)
#
# It writes at most 8 files into $out, each the log of one kind of check; blocks append to their log:
#   gpu.txt                       the GPU, driver, torch / transformers / accelerate versions
#   pytest-cuda.txt               the tests marked `cuda` (fp16 skipped step, capability, allocator figures, ...)
#   profile-isolation.txt         a recipe's CUDA profile row: two orders, two step counts, vs a Trainer  [b7profile]
#   estimate-accuracy-cuda.txt    estimate_memory vs real Trainer runs, bert-base/large at 512, every recipe
#   speed-grid.json               step time and peak of bert-base/large x precision x checkpointing x micro 8/16/32
#   speed-model.txt               the grid's table, and the speed model scored against it              [c7speed]
#   plan-measure.txt              the planner's picks and `tfmem plan --measure`                         [c7speed]
#   summary.txt                   one line per block: exit status, seconds, its last line (the headline)
# The 8 files are taken: a new check appends a block to the log it belongs to (a test marked `cuda` goes
# into pytest-cuda.txt on its own). Anything else a block writes goes under "$scratch" (a temporary
# directory, removed at the end), never into $out: the device tool returns at most 8 files from $OUT.
#
# Each block runs under `timeout` with its own share of the 8 minutes (`block NAME LOG SECONDS CMD...`);
# a block that would start with less than 20 s left is skipped and says so in summary.txt. The exit status
# is 0 only when every block passed. Record the figures in README.md ("Measured on a GPU"), naming the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
BUDGET_S=${GPU_CHECKS_BUDGET_S:-470}   # 8 minutes, less a margin for start-up and the summary
started=$SECONDS
status=0

# The GPU machines have their own PyTorch, transformers and accelerate (CUDA builds) and no network:
# run from the source tree with that python rather than installing anything.
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false

block() {  # block NAME LOG LIMIT_S COMMAND...: run COMMAND, appending its output to $out/LOG, within LIMIT_S
  local name=$1 log=$2 limit=$3
  shift 3
  local left=$((BUDGET_S - (SECONDS - started)))
  if ((left < 20)); then
    printf '%-28s skipped: %ss of the budget left\n' "$name" "$left" >>"$out/summary.txt"
    status=1
    return
  fi
  ((limit > left)) && limit=$left
  local before=0
  [[ -f "$out/$log" ]] && before=$(wc -l <"$out/$log")
  printf '== %s (limit %ss): %s\n' "$name" "$limit" "$*" >>"$out/$log"
  local t0=$SECONDS
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$out/$log"
  local rc=${PIPESTATUS[0]}
  ((rc != 0)) && status=1
  local headline
  headline=$(tail -n +"$((before + 2))" "$out/$log" | grep -v '^[[:space:]]*$' | tail -n 1)
  ((rc == 124 || rc == 137)) && headline="TIMED OUT after ${limit}s; last: $headline"
  printf '%-28s exit %3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$headline" >>"$out/summary.txt"
}

$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'" || exit 2
: >"$out/summary.txt"

# --- the machine ----------------------------------------------------------------------------------------
block gpu gpu.txt 30 bash -c "nvidia-smi --query-gpu=name,memory.total,compute_cap,driver_version --format=csv; \
  $PY -c 'import torch, transformers, accelerate; p = torch.cuda.get_device_properties(0); \
print(f\"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, \
accelerate {accelerate.__version__}; {p.name}: {p.multi_processor_count} SMs, capability {p.major}.{p.minor}\")'"

# --- 7.7 and every other test marked `cuda` ----------------------------------------------------------------
block pytest-cuda pytest-cuda.txt 90 $PY -m pytest -m cuda -v -p no:cacheprovider --no-header -rfs

# --- 7.1 reproducible profile rows (b7profile) --------------------------------------------------------------
# bert-base 32x512, low-memory and checkpointing: alone (1 step), after an fp16 row (3 steps), through the CLI
# (2 steps), and a real Trainer run of each in its own process; ends with the spread (goal <= 1%) and the
# largest difference from the Trainer (goal <= 3%). Expected 1-2 minutes (9 rows + 2 Trainer runs).
block profile-isolation profile-isolation.txt 150 $PY benchmarks/profile_isolation.py --device cuda

# --- 7.5 the estimator against real Trainer runs (~3 min on an H200) -----------------------------------
block estimate-accuracy estimate-accuracy-cuda.txt 200 $PY benchmarks/estimate_accuracy.py --device cuda

# --- 7.2 the speed grid (time-bounded), then the speed model scored on it -----------------------------
block speed-grid speed-model.txt 100 $PY benchmarks/speed_grid.py --device cuda --time-limit 75 \
  --output "$out/speed-grid.json"
block speed-model speed-model.txt 30 $PY benchmarks/speed_model.py --grid "$out/speed-grid.json"

# --- 7.3 / 7.4 `tfmem plan --measure`: the 3 fastest fitting recipes for bert-large 32x512 in 8 GiB, each
# trained a few real steps in its own process, re-ranked by measured time (predicted vs measured table)
cap=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
block plan-measure plan-measure.txt 90 $PY -m tfmem plan --model bert-large-uncased --seq-len 512 \
  --batch-size 32 --gpu-capability "$cap" --budget 8GiB --measure 3

# --- issue 8: optimizer state of bert-base under adamw / adamw-8bit / adafactor, predicted vs a real CUDA
#     step (about 1 min; the GPU machines may lack bitsandbytes: the 8-bit rows then say they were skipped).
#     Its tests marked `cuda` (TF32, 8-bit AdamW) run in the pytest-cuda block. [f8tech]
block optimizer-state estimate-accuracy-cuda.txt 90 $PY benchmarks/optimizer_state.py --device cuda

printf 'gpu_checks: %ss in all, exit %s; %s file(s) in %s\n' "$((SECONDS - started))" "$status" \
  "$(find "$out" -maxdepth 2 -type f | wc -l)" "$out" | tee -a "$out/summary.txt"
exit $status
