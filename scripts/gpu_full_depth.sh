#!/usr/bin/env bash
# Issue 19 headline rows: the FULL OpenMoE-8B (24 layers, 11.9B parameters) on 2 GPUs, 65,536 tokens per step,
# dropless: ours `ep` (grouped GEMM; bmm for comparison), `hybrid` pp 2, and baseline (c) per-expert loop under
# FSDP2 (benchmark/run_train_bench.py FULL_CONFIGS), from the project root with the wheel bundle in .whl/:
#   source scripts/offline_env.sh && BENCH_OUT=/tmp/full bash scripts/gpu_full_depth.sh [ONLY]
# ONLY: a --only selection (default: every full-depth row, 8bfull-2gpu). Output: BENCH_OUT/NAME.json + NAME.log,
# summary.md (the driver stops launching at BUDGET_S seconds, default 540).
set -uo pipefail
BENCH_OUT=${BENCH_OUT:-outputs/bench-full}
mkdir -p "$BENCH_OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$BENCH_OUT/gpus.txt"
nvidia-smi topo -m >> "$BENCH_OUT/gpus.txt" 2>&1
python3 -c "import torch, colossalai, transformers; print('torch', torch.__version__, 'colossalai', colossalai.__version__, 'transformers', transformers.__version__)" | tee -a "$BENCH_OUT/gpus.txt"
python3 benchmark/run_train_bench.py --out "$BENCH_OUT" --budget_s "${BUDGET_S:-540}" --only "${1:-8bfull-2gpu}"
