#!/usr/bin/env bash
# Fetch, here, the wheels of the Python packages the GPU machines lack, for benchmarks/gpu_checks.sh to carry:
#   bash benchmarks/gpu_wheels.sh            # into .whl/ (about 0.9 MB), then the device call with carry [".whl"]
#   GPU_WHEELS_PYTHON=3.11 bash benchmarks/gpu_wheels.sh /tmp/w311   # for a rehearsal here (Python 3.11):
#   GPU_CHECKS_WHEELS=/tmp/w311 GPU_CHECKS_REHEARSAL=1 ... bash benchmarks/gpu_checks.sh
#
# The GPU machines (Python 3.12, no network) have torch, transformers, accelerate, pyarrow, pandas, fsspec,
# xxhash, huggingface-hub, pyyaml, tqdm, filelock, packaging, numpy, but not `datasets` nor two of its
# requirements, dill and multiprocess (its other Requires-Dist are all there). Without `datasets` the tests
# that need it skip (tests marked `cuda` in test_optimizer.py and test_dataset_and_phases.py among them).
#
# Pinned to the versions CI tests with (the dev venv): datasets 5.2.0 needs dill <0.4.2, multiprocess <0.70.20,
# huggingface-hub >=1.31 (1.33 there) and pyarrow >=24 (not known there: gpu_checks.sh builds a Dataset
# after installing, and drops the wheels again if that fails). One version of each: two stop the install.
# .whl/ must be ignored by git (it is carried, never committed): in the main repository's .git/info/exclude
# (worktrees share it), the line `/.whl/`.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
PY=${PYTHON:-python3}
PYVER=${GPU_WHEELS_PYTHON:-3.12}  # the GPU machines' Python
PACKAGES=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)

mkdir -p "$dest"
if [[ $dest != /* ]] && ! git check-ignore -q "$dest/x.whl" 2>/dev/null; then  # inside the repository
  echo "warning: $dest/ is not ignored by git; add the line '/$dest/' to $(git rev-parse --git-common-dir)/info/exclude" >&2
fi
rm -f "$dest"/*.whl  # a stale second version of a package would stop the install there
# The device README's command: CPython 3.12 (PYVER) wheels for x86-64 Linux, no dependencies (each is named above).
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "${PACKAGES[@]}"
ls -l "$dest"/*.whl
echo "gpu_wheels: $(find "$dest" -maxdepth 1 -type f -name '*.whl' | wc -l) wheels, $(du -sh "$dest" | cut -f1) in $dest/"
