#!/usr/bin/env bash
# Step time of OpenMoE-base (random init) with `ep` on 2 GPUs (EP 2, ZeRO-1, bf16), 30 steps each:
#   capacity routing: plain all-to-all vs --comm_overlap 4, at 4 x 1024 tokens per GPU per step;
#   a router skewed towards EP rank 0's experts (benchmark/skewed_router.py), dropless: no balancing vs
#   --load_balance (placement rebalancing every 5 steps) vs --balance_mode bias.
#   source scripts/offline_env.sh && bash scripts/gpu_balance_check.sh
# VARIANTS (space-separated subset of the five below) and MAX_STEPS (default 30) select a shorter run.
set -uo pipefail
LOGS=${OUT:-outputs/gpu-balance}
mkdir -p "$LOGS"
python3 benchmark/skewed_router.py --model base --out /tmp/skewed-base > "$LOGS/skew.log" 2>&1 || cat "$LOGS/skew.log"
tail -1 "$LOGS/skew.log"
common=(--model_name base --tokenizer tests/assets/tokenizer --plugin ep --pack --max_length 1024 --batch_size 4 --lr 3e-4
        --max_steps "${MAX_STEPS:-30}" --no-tensorboard)
read -r -a variants <<< "${VARIANTS:-capacity overlap4 skew-dropless skew-dropless-lb5 skew-dropless-bias}"
port=29800
for v in "${variants[@]}"; do
  case $v in
    capacity) extra=() ;;
    overlap4) extra=(--comm_overlap 4) ;;
    skew-dropless) extra=(--pretrained /tmp/skewed-base --dropless) ;;
    skew-dropless-lb5) extra=(--pretrained /tmp/skewed-base --dropless --load_balance --load_balance_interval 5) ;;
    skew-dropless-bias) extra=(--pretrained /tmp/skewed-base --dropless --balance_mode bias --bias_update_rate 0.01) ;;
  esac
  rm -f "$LOGS/$v.metrics.jsonl"
  port=$((port + 1))
  timeout "${VARIANT_TIMEOUT_S:-300}" colossalai run --nproc_per_node 2 --master_port $port train.py "${common[@]}" "${extra[@]}" \
    --output_path /tmp/bal-$v > "$LOGS/$v.log" 2>&1 || echo "$v: failed or timed out, see $LOGS/$v.log"
  cp /tmp/bal-$v/metrics.jsonl "$LOGS/$v.metrics.jsonl" 2>/dev/null
  grep -h "expert rebalance" "$LOGS/$v.log" | head -2
done
python3 - "$LOGS" "${variants[@]}" <<'PY'
import json, os, statistics, sys
logs, variants = sys.argv[1], sys.argv[2:]
print(f"{'variant':20} {'steps':>5} {'tok/s (10-30)':>13} {'loss last':>9} {'EP-rank load max/mean':>24} {'peak GiB':>8}")
for v in variants:
    path = f"{logs}/{v}.metrics.jsonl"
    rows = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
    steps = [r for r in rows if "tokens_per_s" in r]
    if not steps:
        print(f"{v:20} failed")
        continue
    rate = statistics.median(r["tokens_per_s"] for r in steps[10:]) if len(steps) > 10 else float("nan")
    moves = [r for r in rows if "rebalance" in r]
    if moves:  # first rebalance: loads under the initial placement; last: actual loads under the moved placement
        load = f"{moves[0]['rank_load_max_over_mean_before']:.2f} -> {moves[-1]['rank_load_max_over_mean_before']:.2f}"
    else:  # identity placement: expert e on rank e // (E / 2); worst MoE layer over the last 10 steps
        import numpy as np
        t = np.array([r["tokens_per_expert"] for r in steps[-10:]], dtype=float).sum(0)  # [layers, E]
        ranks = t.reshape(t.shape[0], 2, -1).sum(2)
        load = f"{(ranks.max(1) / ranks.mean(1)).max():.2f}"
    peak = max((r.get("peak_mem_gib", float("nan")) for r in steps), default=float("nan"))
    print(f"{v:20} {len(steps):5d} {rate:13.0f} {steps[-1]['loss']:9.3f} {load:>24} {peak:8.2f}")
PY
