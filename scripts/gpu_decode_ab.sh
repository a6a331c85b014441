#!/usr/bin/env bash
# Issue 18, batch-1 decode: the working tree's fast decoder against an earlier one in the same process, same weights
# (benchmark/infer_fast_bench.py --baseline_decoder), then the working tree's with inductor's coordinate-descent tuning.
# From the project root with the wheel bundle .whl/ beside it, on one H200:
#   git show REV:openmoe/fast_decode.py > benchmark/prev/fast_decode_REV.py   # the baseline, untracked
#   source scripts/offline_env.sh && BASELINE=benchmark/prev/fast_decode_REV.py bash scripts/gpu_decode_ab.sh
# Results in $OUT (default ./gpu_decode_ab_out): ab.log + ab/ (rows, profiles), cdt.log + cdt/, one tarball.
set -u
OUT=${OUT:-$PWD/gpu_decode_ab_out}
mkdir -p "$OUT/ab" "$OUT/cdt"
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
common=(--model 8b --prompt_len 128 --new_tokens 128 --short_tokens 16 --moe_impls --compile --skip_eager
        --ttft_prompt_len 0 --warmup 1)
timeout "${AB_TIMEOUT:-330}" python3 benchmark/infer_fast_bench.py "${common[@]}" --batch_sizes 1 16 \
  --compile_impls gemv:1 grouped --baseline_decoder "${BASELINE:?set BASELINE}" --profile --out "$OUT/ab" \
  > "$OUT/ab.log" 2>&1
echo "A/B exit $?"; grep -E "^batch|^profile" "$OUT/ab.log" | cut -c1-160
TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 timeout "${CDT_TIMEOUT:-180}" python3 benchmark/infer_fast_bench.py \
  "${common[@]}" --batch_sizes 1 --compile_impls gemv --out "$OUT/cdt" > "$OUT/cdt.log" 2>&1
echo "coordinate-descent exit $?"; grep -E "^batch" "$OUT/cdt.log" | cut -c1-160
tar -C "$OUT" -czf "$OUT/decode_ab.tgz" ab cdt ab.log cdt.log gpu.txt && rm -rf "$OUT/ab" "$OUT/cdt"
