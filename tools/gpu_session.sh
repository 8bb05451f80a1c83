#!/usr/bin/env bash
# The GPU checks of issues 3, 4, 9 and 10, for a session lent a GPU machine (see
# benchmarks/README.md, "On a lent GPU"). Each stage fits one device call (< 10 min); results
# and logs go to $OUT (default: gpu-out/), benchmark tables also to benchmarks/results/.
#
#   tools/gpu_session.sh build      # compile rlhf_fast._C with the CUDA kernels (in place)
#   tools/gpu_session.sh test       # pytest -m cuda, then the Triton tests on the GPU
#   tools/gpu_session.sh bench-ops  # Triton kernels and CUDA GAE / sampler vs peers
#   tools/gpu_session.sh bench-e2e  # one PPO / GRPO step vs TRL on a Qwen2-0.5B-shaped model
#   tools/gpu_session.sh all        # the four in order (needs about 15 min: split it)
#
# The machine has torch/Triton but no internet: TRL (for bench-e2e's peer) travels as wheels
# in .whl/ (see the device README); without it the TRL rows say "TRL side failed".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

stage_build() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/gpu.txt" 2>&1
  $PY -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >>"$OUT/gpu.txt" 2>&1
  MAX_JOBS=$(nproc) $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1
  local rc=$?
  tail -5 "$OUT/build.log"
  $PY -c "from rlhf_fast.ops._dispatch import backend_available as b; print({k: b(k) for k in ('cpp', 'cuda', 'triton')})" \
    2>&1 | tee -a "$OUT/build.log"
  return $rc
}

stage_test() {
  $PY -m pytest -q -p no:cacheprovider -m cuda tests --ignore=tests/triton -x --timeout=300 \
    >"$OUT/pytest-cuda.log" 2>&1
  local rc=$?
  tail -15 "$OUT/pytest-cuda.log"
  $PY -m pytest -q -p no:cacheprovider tests/triton -x --timeout=300 >"$OUT/pytest-triton-gpu.log" 2>&1
  local rc2=$?
  tail -5 "$OUT/pytest-triton-gpu.log"
  return $((rc || rc2))
}

stage_bench_ops() {
  $PY -m rlhf_fast.cli bench ops --device cuda --out benchmarks/results >"$OUT/bench-ops.log" 2>&1
  local rc=$?
  tail -40 "$OUT/bench-ops.log"
  cp benchmarks/results/*.md benchmarks/results/*.json "$OUT/" 2>/dev/null
  return $rc
}

stage_bench_e2e() {
  $PY -m rlhf_fast.benchmarks.e2e --device cuda --write >"$OUT/bench-e2e.log" 2>&1
  local rc=$?
  tail -25 "$OUT/bench-e2e.log"
  cp benchmarks/results/*.md benchmarks/results/*.json "$OUT/" 2>/dev/null
  return $rc
}

case "${1:-}" in
  build) stage_build ;;
  test) stage_test ;;
  bench-ops) stage_bench_ops ;;
  bench-e2e) stage_bench_e2e ;;
  all) stage_build && stage_test; stage_bench_ops; stage_bench_e2e ;;
  *) echo "usage: tools/gpu_session.sh build|test|bench-ops|bench-e2e|all" >&2; exit 2 ;;
esac
