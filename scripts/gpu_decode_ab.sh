#!/usr/bin/env bash
# Issue 18, batch-1 decode: the working tree's fast decoder against an earlier one in the same process, same weights
# (benchmark/infer_fast_bench.py --baseline_decoder), and without each decode kernel (+norope, +nodense), after the
# kernel check (which also sweeps the dense GEMV tiles for o_proj/down_proj). From the project root with the wheel
# bundle .whl/ beside it, one H200:
#   git show REV:openmoe/fast_decode.py > benchmark/prev/fast_decode_REV.py   # the baseline (ignored by git)
#   source scripts/offline_env.sh && BASELINE=benchmark/prev/fast_decode_REV.py bash scripts/gpu_decode_ab.sh
# IMPLS (default "gemv:1 gemv+norope:1 gemv+nodense:1 gemv+baseline:1 grouped") are the compiled rows, beside
# transformers' generate and the TTFT of a 2,048-token prompt; TILES='{GemvTiles JSON}' skips the kernel check; CDT=1 adds a row of the
# first IMPL under inductor's coordinate-descent tuning. Results in $OUT (default ./gpu_decode_ab_out):
# decode_ab.tgz (logs, JSON, profiles).
set -u
OUT=${OUT:-$PWD/gpu_decode_ab_out}
mkdir -p "$OUT/ab" "$OUT/cdt"
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
tiles=()
if [ -n "${TILES:-}" ]; then  # GemvTiles JSON (e.g. an earlier check's best_tiles): no kernel check
  tiles=(--gemv_tiles "$TILES")
elif timeout 150 python3 benchmark/infer_fast_bench.py --model 8b --check_kernels_only --out "$OUT/ab" \
    > "$OUT/check.log" 2>&1; then
  tiles=(--gemv_tiles "$(python3 -c "import json; print(json.dumps(json.load(open('$OUT/ab/kernel_check.json'))['best_tiles']))")")
  grep '"dense gemv"' "$OUT/check.log" | python3 -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(r['shape'], r['path'], r.get('tiles', ''), '%.1f us' % r['us'] if r.get('us') else r.get('error', '')[:80],
          '%.2f TB/s' % r['TBps'] if r.get('TBps') else '', 'err %.1e' % r['rel_err'] if 'rel_err' in r else '')"
fi
echo "tiles: ${tiles[*]:-defaults}"
common=(--model 8b --prompt_len 128 --new_tokens 128 --short_tokens 16 --moe_impls --compile --warmup 1 "${tiles[@]}")
# shellcheck disable=SC2086  # IMPLS is a list of words
timeout "${AB_TIMEOUT:-400}" python3 benchmark/infer_fast_bench.py "${common[@]}" --batch_sizes 1 16 \
  --compile_impls ${IMPLS:-gemv:1 gemv+norope:1 gemv+nodense:1 gemv+baseline:1 grouped} --baseline_decoder "${BASELINE:?set BASELINE}" \
  --ttft_prompt_len 2048 --profile --out "$OUT/ab" > "$OUT/ab.log" 2>&1
echo "A/B exit $?"; grep -E "^batch|^profile|^TTFT" "$OUT/ab.log" | cut -c1-190
if [ "${CDT:-0}" = 1 ]; then
  # shellcheck disable=SC2086
  TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 timeout "${CDT_TIMEOUT:-150}" python3 benchmark/infer_fast_bench.py \
    "${common[@]}" --skip_eager --ttft_prompt_len 0 --batch_sizes 1 --compile_impls $(echo ${IMPLS:-gemv:1} | cut -d' ' -f1) --out "$OUT/cdt" \
    > "$OUT/cdt.log" 2>&1
  echo "coordinate-descent exit $?"; grep -E "^batch" "$OUT/cdt.log" | cut -c1-150
fi
# shellcheck disable=SC2046  # the names are plain
tar -C "$OUT" -czf "$OUT/decode_ab.tgz" $(cd "$OUT" && ls -d ab cdt ./*.log gpu.txt 2>/dev/null) \
  && rm -rf "$OUT/ab" "$OUT/cdt" "$OUT"/*.log
