#!/usr/bin/env bash
# Issue 18 items 1-2 on one H200, from the project root (the wheel bundle .whl/ beside it):
#   source scripts/offline_env.sh && TORCHINDUCTOR_COMPILE_THREADS=16 bash scripts/gpu_decode.sh
# 1. the decode kernels against their references at OpenMoE-8B's shapes, with device times (kernel_check.json);
#    a mismatch or a crash leaves the Triton GEMV out of step 2;
# 2. OpenMoE-8B bf16 decode at batch 1 and 16, compiled (grouped GEMM experts; the Triton GEMV experts at batch 1)
#    beside transformers' generate, profiles of the compiled batch-1 steps, TTFT of a 2,048-token prompt.
# Results in $OUT (default ./gpu_decode_out): check.log, kernel_check.json, bench.log, infer_fast_bench.json,
# profile_*.txt.
set -u
OUT=${OUT:-$PWD/gpu_decode_out}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/check.log" 2>&1
impls="grouped gemv:1"  # gemv at batch 1 only: auto takes grouped beyond 8 (token, choice) pairs
tiles=()
if timeout 90 python3 benchmark/infer_fast_bench.py --model 8b --check_kernels_only --out "$OUT" \
    >> "$OUT/check.log" 2>&1; then
  # the fastest correct tile choice of the check's sweep
  tiles=(--gemv_tiles "$(python3 -c "import json; print(json.dumps(json.load(open('$OUT/kernel_check.json'))['best_tiles']))")")
else
  echo "kernel check failed: benchmarking without the Triton GEMV" | tee -a "$OUT/check.log"
  impls="grouped"
fi
tail -n 12 "$OUT/check.log"
# shellcheck disable=SC2086  # $impls is a list of words
timeout 200 python3 benchmark/infer_fast_bench.py --model 8b --batch_sizes 1 16 --prompt_len 128 --new_tokens 32 \
  --short_tokens 8 --moe_impls --compile --compile_impls $impls --ttft_prompt_len 2048 --warmup 1 --profile \
  "${tiles[@]}" --out "$OUT" > "$OUT/bench.log" 2>&1
echo "benchmark exit $?"
tail -n 25 "$OUT/bench.log"
