#!/usr/bin/env bash
# Training benchmark table (tokens/s/GPU, model TFLOP/s, MFU, peak memory, all-to-all share; ours vs baselines a/b)
# on the lent GPU machine (2 x H200), from the project root with the offline wheel bundle in .whl/. Two halves, each
# under the 10-minute command limit (the driver stops launching at BUDGET_S seconds, default 540):
#   source scripts/offline_env.sh && bash scripts/gpu_train_bench.sh 1gpu    # 1-GPU rows + MoE-layer micro-benchmark
#   source scripts/offline_env.sh && bash scripts/gpu_train_bench.sh 2gpu    # 2-GPU rows
# Any --only selection works as the first argument (e.g. 8b-1gpu, base, micro, 8b-L4-2gpu-ours-ep); none: everything.
# Output in $OUT (or ./outputs/bench): NAME.json + NAME.log per configuration, summary.md, tokens_per_gpu.png.
# Both halves' tables in one: python3 benchmark/summarize_bench.py DIR_1GPU DIR_2GPU
set -uo pipefail
ONLY=${1:-}
OUT=${OUT:-outputs/bench}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpus.txt"
python3 -c "import torch, colossalai, transformers; print('torch', torch.__version__, 'colossalai', colossalai.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpus.txt"
python3 benchmark/run_train_bench.py --out "$OUT" --budget_s "${BUDGET_S:-540}" ${ONLY:+--only "$ONLY"}
