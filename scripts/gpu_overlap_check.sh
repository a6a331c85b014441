#!/usr/bin/env bash
# Step time of OpenMoE-base (random init) with `ep` on 2 GPUs: plain, --comm_overlap 4, --balance_mode bias.
#   source scripts/offline_env.sh && bash scripts/gpu_overlap_check.sh
set -uo pipefail
LOGS=${OUT:-outputs/gpu-overlap}
mkdir -p "$LOGS"
common=(--model_name base --tokenizer tests/assets/tokenizer --plugin ep --pack --max_length 512 --batch_size 2 --lr 3e-4 --max_steps 40
        --no-tensorboard)
port=29700
for variant in plain overlap4 bias; do
  extra=()
  [ "$variant" = overlap4 ] && extra=(--comm_overlap 4)
  [ "$variant" = bias ] && extra=(--balance_mode bias --bias_update_rate 0.01)
  port=$((port + 1))
  colossalai run --nproc_per_node 2 --master_port $port train.py "${common[@]}" "${extra[@]}" \
    --output_path /tmp/ov-$variant > "$LOGS/$variant.log" 2>&1
  cp /tmp/ov-$variant/metrics.jsonl "$LOGS/$variant.metrics.jsonl"
done
python3 - "$LOGS" <<'PY'
import json, sys, statistics
logs = sys.argv[1]
print(f"{'variant':9} {'tok/s median (steps 10-40)':>27} {'loss last':>9} {'max/mean expert load (last 10 steps, all layers)':>50}")
for v in ("plain", "overlap4", "bias"):
    rows = [json.loads(l) for l in open(f"{logs}/{v}.metrics.jsonl")]
    rate = statistics.median(r["tokens_per_s"] for r in rows[10:])
    import numpy as np
    load = np.array([r["tokens_per_expert"] for r in rows[-10:]], dtype=float).sum(0)  # [layers, E]
    skew = (load.max(1) / load.mean(1)).max()
    print(f"{v:9} {rate:27.0f} {rows[-1]['loss']:9.3f} {skew:50.2f}")
PY
