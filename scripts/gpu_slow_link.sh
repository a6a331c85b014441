#!/usr/bin/env bash
# Issue 19, item 3: overlap and load balancing on an emulated slow link. NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 make
# NCCL move data between the two GPUs of one host over its socket transport (host memory and TCP loopback), as it
# would between nodes without InfiniBand. From the project root with the wheel bundle in .whl/:
#   source scripts/offline_env.sh && BENCH_OUT=/tmp/slow bash scripts/gpu_slow_link.sh
# 1. benchmark/run_train_bench.py --only slow-2gpu: capacity routing, plain all-to-all vs --comm_overlap 4, at
#    OpenMoE-base and the full OpenMoE-8B (BENCH_OUT/NAME.json + NAME.log, summary.md).
# 2. scripts/gpu_balance_check.sh: a router skewed to EP rank 0's experts, dropless, no balancing vs --load_balance
#    (rebalance every 5 steps), MAX_STEPS steps each (BENCH_OUT/balance/).
set -uo pipefail
export NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1
BENCH_OUT=${BENCH_OUT:-outputs/bench-slow}
mkdir -p "$BENCH_OUT"
python3 benchmark/run_train_bench.py --out "$BENCH_OUT" --budget_s "${BUDGET_S:-360}" --only "${ONLY:-slow-2gpu}"
OUT="$BENCH_OUT/balance" VARIANT_TIMEOUT_S="${VARIANT_TIMEOUT_S:-100}" VARIANTS="${VARIANTS:-skew-dropless skew-dropless-lb5}" MAX_STEPS="${MAX_STEPS:-20}" \
  bash scripts/gpu_balance_check.sh
