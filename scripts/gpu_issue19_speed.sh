#!/usr/bin/env bash
# Issue 19 speed levers on 2 GPUs, the full OpenMoE-8B step of scripts/gpu_full_depth.sh (65,536 tokens, dropless):
# --compile_blocks at 2 x 8 and 4 x 4 sequences per micro-batch x micro-batches, the eager row again (same-run
# reference), the 4-layer shape compiled, baseline (c) again, and a memory row with activation checkpointing
# (benchmark/run_train_bench.py SPEED_CONFIGS), from the project root with the wheel bundle in .whl/:
#   source scripts/offline_env.sh && BENCH_OUT=/tmp/speed BUDGET_S=500 bash scripts/gpu_issue19_speed.sh
# then the two rows with ZeRO's reduction overlapped (--overlap_communication):
#   source scripts/offline_env.sh && BENCH_OUT=/tmp/speed2 BUDGET_S=200 bash scripts/gpu_issue19_speed.sh \
#     8bfull-2gpu-ours-ep-compiled-b4x4-ovl,8bfull-2gpu-ours-ep-compiled-ovl
# and the lean ZeRO-1 rows (--lean_zero) beside their references and baseline (a), as in benchmark/RESULTS.md ("Issue 19, session 6"):
#   source scripts/offline_env.sh && BENCH_OUT=/tmp/s6 BUDGET_S=480 bash scripts/gpu_issue19_speed.sh \
#     8bfull-2gpu-ours-ep-compiled-b4x4-lean,8bfull-2gpu-ours-ep-compiled-b4x4,8bL4acc-2gpu-ours-ep-compiled-lean,8bL4acc-2gpu-ours-ep-compiled,8bL4acc-2gpu-mixtral
# Output: BENCH_OUT/NAME.json + NAME.log, summary.md, gpus.txt (the driver stops launching at BUDGET_S seconds).
set -uo pipefail
BENCH_OUT=${BENCH_OUT:-outputs/bench-speed}
mkdir -p "$BENCH_OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$BENCH_OUT/gpus.txt"
python3 -c "import torch, colossalai, transformers; print('torch', torch.__version__, 'colossalai', colossalai.__version__, 'transformers', transformers.__version__)" | tee -a "$BENCH_OUT/gpus.txt"
ROWS=8bfull-2gpu-ours-ep-compiled,8bfull-2gpu-ours-ep-compiled-b4x4,8bfull-2gpu-ours-ep-eager
ROWS=$ROWS,8bL4acc-2gpu-ours-ep-compiled,8bfull-2gpu-fsdp-loop-again,8bfull-2gpu-ours-ep-compiled-ac-b8x2
python3 benchmark/run_train_bench.py --out "$BENCH_OUT" --budget_s "${BUDGET_S:-500}" --only "${1:-$ROWS}"
