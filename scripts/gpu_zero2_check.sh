#!/usr/bin/env bash
# ZeRO-1 vs ZeRO-2 (+ ZeRO's overlap_communication) for OpenMoE-base (random init) on 2 GPUs, 30 steps each:
# `ep` (experts over both GPUs, dense parameters ZeRO-sharded) and `ep_zero --extra_dp_size 2` (every expert on both
# GPUs, so expert gradients are ZeRO-reduced too: the case ColossalAI's MoE plugin refuses ZeRO-2 for).
#   source scripts/offline_env.sh && bash scripts/gpu_zero2_check.sh
# Prints tokens/s (median of steps 10-30), last loss, the largest loss difference from the same plugin's ZeRO-1 run
# (same init and data: expect rounding-level differences only) and rank 0's peak GPU memory.
# The overlap variants run once train.py has --overlap_communication; until then they are reported as skipped.
set -uo pipefail
LOGS=${OUT:-outputs/gpu-zero2}
mkdir -p "$LOGS"
common=(--model_name base --tokenizer tests/assets/tokenizer --pack --max_length 512 --batch_size 2 --lr 3e-4 --max_steps 30
        --no-tensorboard)
has_overlap=0
python train.py --help 2>/dev/null | grep -q -- --overlap_communication && has_overlap=1
variants=(ep-z1 ep-z2 ep-z2-overlap epzero-z1 epzero-z2 epzero-z2-overlap)
port=29750
for v in "${variants[@]}"; do
  case $v in ep-*) plugin=(--plugin ep) ;; *) plugin=(--plugin ep_zero --extra_dp_size 2) ;; esac
  case $v in
    *-z1) zero=(--zero_stage 1) ;;
    *-z2) zero=(--zero_stage 2) ;;
    *) zero=(--zero_stage 2 --overlap_communication) ;;
  esac
  rm -f "$LOGS/$v.metrics.jsonl"
  if [[ $v == *overlap && $has_overlap == 0 ]]; then continue; fi
  port=$((port + 1))
  timeout 900 colossalai run --nproc_per_node 2 --master_port $port train.py "${common[@]}" "${plugin[@]}" \
    "${zero[@]}" --output_path /tmp/z2-$v > "$LOGS/$v.log" 2>&1 || echo "$v: failed or timed out, see $LOGS/$v.log"
  cp /tmp/z2-$v/metrics.jsonl "$LOGS/$v.metrics.jsonl" 2>/dev/null
done
python3 - "$LOGS" "${variants[@]}" <<'PY'
import json, os, statistics, sys
logs, variants = sys.argv[1], sys.argv[2:]
def rows(v):
    path = f"{logs}/{v}.metrics.jsonl"
    return [json.loads(l) for l in open(path)] if os.path.exists(path) else []
print(f"{'variant':18} {'steps':>5} {'tok/s (10-30)':>13} {'loss last':>9} {'max |dloss| vs z1':>17} {'peak GiB':>8}")
for v in variants:
    r = rows(v)
    if not r:
        print(f"{v:18} {'skipped or failed':>17}")
        continue
    base = rows(v.split("-")[0] + "-z1")
    diff = max((abs(a["loss"] - b["loss"]) for a, b in zip(r, base)), default=float("nan"))
    rate = statistics.median(x["tokens_per_s"] for x in r[10:]) if len(r) > 10 else float("nan")
    peak = max((x.get("peak_mem_gib", float("nan")) for x in r), default=float("nan"))
    print(f"{v:18} {len(r):5d} {rate:13.0f} {r[-1]['loss']:9.3f} {diff:17.2e} {peak:8.2f}")
PY
