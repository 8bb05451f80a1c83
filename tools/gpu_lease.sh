#!/usr/bin/env bash
# Every GPU check of issues 4, 9 and 10 in ONE device call under a wall-clock budget
# (a lent GPU has ~15 min in all, machine start included): the CUDA build runs while the
# Triton tests run on the GPU, then `pytest -m cuda`, the end-to-end PPO / GRPO step against
# TRL on a Qwen2-0.5B-shaped model (the headline figure of issue 10, so it runs before the
# op benchmarks), the GAE / sampling benchmark, generation alone, and the Triton op
# benchmark, each stage cut off at what is left of the budget. Logs and result tables go
# to $OUT, 8 files at most (the most a device call brings back): log.txt, build.log,
# pytest.log, bench.log, gae_sampling.jsonl, rollout.jsonl and the results .md / .json.
#
#   BUDGET_S=420 tools/gpu_lease.sh           # on the device machine, from the repo root
#
# Peers that do not ship on the machine (TRL and its datasets/dill/multiprocess, Liger-Kernel)
# travel as wheels in .whl/ (see the device README).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export OUT
PY=${PY:-python3}
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-420}
# STAGES: which of triton-tests, cuda-tests, bench-gae, bench-rollout, bench-e2e, bench-e2e-dpo, bench-e2e-distill,
# bench-ops
# to run
# (all by default)
STAGES=${STAGES:-"triton-tests cuda-tests bench-gae bench-rollout bench-e2e bench-e2e-dpo bench-e2e-distill bench-ops"}
TRITON_TESTS=${TRITON_TESTS:-tests/triton}
want() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
LOG="$OUT/log.txt"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

left() { echo $((BUDGET_S - ($(date +%s) - T0))); }
# stage NAME CAP_S LOGFILE CMD...: run CMD with a timeout of min(CAP_S, budget left)
stage() {
  local name=$1 cap=$2 logf=$3; shift 3
  local l; l=$(left)
  local t=$(( cap < l ? cap : l ))
  if [ "$t" -lt 10 ]; then echo "== $name: skipped (budget spent)"; return 0; fi
  echo "== $name (cap ${t}s) at +$(( $(date +%s) - T0 ))s"
  timeout -k 5 "$t" "$@" >>"$logf" 2>&1
  local rc=$?
  echo "== $name rc=$rc at +$(( $(date +%s) - T0 ))s"
  tail -n 25 "$logf" | sed 's/^/   /'
  return 0
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
nvcc --version | tail -2
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The package without its extension first (seconds), so the Triton tests can start; the
# extension with the CUDA kernels is then built in place, for Hopper only to save minutes.
RLHF_FAST_NO_EXT=1 $PY -m pip install -q --no-deps --no-build-isolation --no-cache-dir -e . >"$OUT/build.log" 2>&1 \
  || echo "editable install failed (see build.log)"
(RLHF_FAST_CUDA_ARCHS=${RLHF_FAST_CUDA_ARCHS:-90} MAX_JOBS=$(nproc) timeout 300 $PY setup.py build_ext --inplace \
  >>"$OUT/build.log" 2>&1; echo "build rc=$? after $(( $(date +%s) - T0 ))s" >>"$OUT/build.log") &
BUILD=$!
want triton-tests && stage "triton tests on the GPU" 70 "$OUT/pytest.log" \
  $PY -m pytest -q -p no:cacheprovider $TRITON_TESTS --timeout=120
echo "== waiting for the extension build"
wait $BUILD
tail -n 30 "$OUT/build.log" | sed 's/^/   /'
$PY -c "from rlhf_fast.ops._dispatch import backend_available as b; print('backends', {k: b(k) for k in ('cpp', 'cuda', 'triton')})"
# xdist: the float64 oracles of the long GAE shapes are Python loops on the CPU (16 cores here)
want cuda-tests && stage "pytest -m cuda" 100 "$OUT/pytest.log" \
  $PY -m pytest -q -p no:cacheprovider -m cuda tests --ignore=tests/triton --timeout=60 -n 8 --durations=10
want bench-e2e && stage "e2e PPO / GRPO step vs TRL" 240 "$OUT/bench.log" $PY - <<'EOF'
import dataclasses, os
from rlhf_fast.benchmarks import e2e
from rlhf_fast.benchmarks.common import write_results
# the 0.5B model of the issue, 64 sequences; 128 new tokens and 2 timed steps to fit the lease
cfg = dataclasses.replace(e2e.E2EConfig.gpu_0p5b(), max_new_tokens=int(os.environ.get("E2E_TOKENS", 128)), steps=2)
tables = e2e.run_suite(device="cuda", cfg=cfg, timeout_s=150, algos=("ppo", "grpo"))
for t in tables:
    print(t.markdown())
print(write_results(tables, device="cuda", out_dir=os.environ["OUT"], suite=f"e2e gpu_0p5b max_new_tokens={cfg.max_new_tokens} steps=2"))
EOF
# the DPO step against TRL's DPOTrainer on the same model (after the RL headline, its own cap)
want bench-e2e-dpo && stage "e2e DPO step vs TRL" 90 "$OUT/bench.log" $PY - <<'EOF'
import dataclasses, os
from rlhf_fast.benchmarks import e2e
from rlhf_fast.benchmarks.common import write_results
cfg = dataclasses.replace(e2e.E2EConfig.gpu_0p5b(), steps=2)
tables = e2e.run_suite(device="cuda", cfg=cfg, timeout_s=80, algos=("dpo",))
for t in tables:
    print(t.markdown())
print(write_results(tables, device="cuda", out_dir=os.environ["OUT"], suite="e2e dpo gpu_0p5b steps=2"))
EOF
# on-policy distillation against TRL's DistillationTrainer: the 0.5B student, a 1.5B-wide teacher
want bench-e2e-distill && stage "e2e distillation step vs TRL" 120 "$OUT/bench.log" $PY - <<'EOF'
import dataclasses, os
from rlhf_fast.benchmarks import e2e
from rlhf_fast.benchmarks.common import write_results
cfg = dataclasses.replace(e2e.E2EConfig.gpu_0p5b(), max_new_tokens=int(os.environ.get("E2E_TOKENS", 128)), steps=2)
tables = e2e.run_suite(device="cuda", cfg=cfg, timeout_s=110, algos=("distill",))
for t in tables:
    print(t.markdown())
print(write_results(tables, device="cuda", out_dir=os.environ["OUT"], suite="e2e distill gpu_0p5b steps=2"))
EOF
want bench-gae && stage "GAE / sampling benchmark" 70 "$OUT/bench.log" \
  $PY -m rlhf_fast.benchmarks.bench_gae_sampling --device cuda --budget 0.25 --out "$OUT/gae_sampling.jsonl"
# generation alone on a 0.5B-shaped Llama (V=151936, 24 layers): CUDA-graph decode vs eager vs HF generate
want bench-rollout && stage "rollout benchmark" 90 "$OUT/bench.log" \
  $PY benchmarks/bench_rollout.py --device cuda --vocab 151936 --hidden 896 --layers 24 --heads 14 --batch 4 \
  --seq 512 --resp 256 --gen-batch 64 --prompt-len 32 --max-new 128 --repeats 4 --profile --out "$OUT/rollout.jsonl"
# one op at a time, each table written as soon as it is done (the budget may cut the rest);
# OPS, OPS_SIZES, OPS_VOCABS narrow it; torch.compile of the reference compiles per shape and
# mode (tens of seconds each), so its rows come only with OPS_COMPILE=1
want bench-ops && stage "Triton op benchmark" 200 "$OUT/bench.log" $PY - <<'EOF'
import os
from rlhf_fast.benchmarks import bench_triton
from rlhf_fast.benchmarks.common import write_results
sizes = tuple(int(s) for s in os.environ.get("OPS_SIZES", "65536").split(","))
for op in os.environ.get("OPS", "token_logprobs,ppo_policy_loss,kl_penalty,fused_linear_logprobs,"
                         "fused_linear_policy_loss,ppo_value_loss").split(","):
    vocabs = tuple(int(v) for v in os.environ.get("OPS_VOCABS", "32000,151936").split(","))
    tables = bench_triton.run_gpu([op], sizes, vocabs, rep=5, compile_peer=os.environ.get("OPS_COMPILE", "0") == "1")
    for t in tables:
        print(t.markdown(), flush=True)
    write_results(tables, device="cuda", out_dir=os.environ["OUT"], suite=f"bench_triton --ops {op} --sizes {','.join(map(str, sizes))}")
EOF
echo "== done at +$(( $(date +%s) - T0 ))s"
