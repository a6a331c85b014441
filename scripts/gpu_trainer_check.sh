#!/usr/bin/env bash
# GPU check of the trainer through `colossalai run` (bf16, NCCL), one configuration after another, then a table.
# On the lent GPU machine, from the project root with the offline wheel bundle in .whl/:
#   source scripts/offline_env.sh && bash scripts/gpu_trainer_check.sh [NPROC] [CONFIGS...]
# Logs go to $OUT (or ./outputs/gpu-check). CONFIGS default: tiny-ep tiny-ep_zero base-ep.
set -uo pipefail
NPROC=${1:-2}; shift || true
CONFIGS=("${@:-tiny-ep tiny-ep_zero base-ep}")
LOGS=${OUT:-outputs/gpu-check}
mkdir -p "$LOGS"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$LOGS/gpus.txt"
python3 -c "import torch, colossalai, transformers; print('torch', torch.__version__, 'colossalai', colossalai.__version__, 'transformers', transformers.__version__)" | tee -a "$LOGS/gpus.txt"
port=29600
for cfg in ${CONFIGS[@]}; do
  model=${cfg%%-*}; plugin=${cfg#*-}; port=$((port + 1))
  args=(--model_name "$model" --tokenizer tests/assets/tokenizer --plugin "$plugin" --output_path "/tmp/gpu-$cfg"
        --no-tensorboard --log_interval 1)
  [ "$plugin" = ep_zero ] && args+=(--extra_dp_size "$NPROC")
  [ "$plugin" = hybrid ] && args+=(--pp_size 2 --ep_size $((NPROC / 2)) --microbatch_size 1)
  if [ "$model" = tiny ]; then args+=(--max_steps 60); else args+=(--max_steps 30 --pack --max_length 256 --batch_size 2 --lr 3e-4); fi
  start=$(date +%s)
  colossalai run --nproc_per_node "$NPROC" --master_port "$port" train.py "${args[@]}" > "$LOGS/$cfg.log" 2>&1
  echo "$cfg exit=$? wall=$(( $(date +%s) - start ))s" | tee -a "$LOGS/summary.txt"
  cp "/tmp/gpu-$cfg/metrics.jsonl" "$LOGS/$cfg.metrics.jsonl" 2>/dev/null
done
python3 - "$LOGS" <<'PY'
import json, os, sys
logs = sys.argv[1]
print(f"{'config':16} {'steps':>5} {'loss first3':>11} {'loss last3':>10} {'tok/s (median, all GPUs)':>25} {'peak GiB r0':>11} {'success':>8}")
for name in sorted(os.listdir(logs)):
    if not name.endswith(".metrics.jsonl"):
        continue
    cfg = name[: -len(".metrics.jsonl")]
    rows = [json.loads(l) for l in open(os.path.join(logs, name))]
    log = open(os.path.join(logs, cfg + ".log")).read()
    rates = sorted(r["tokens_per_s"] for r in rows[3:]) or [0]
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    print(f"{cfg:16} {len(rows):5d} {first:11.3f} {last:10.3f} {rates[len(rates)//2]:25.0f} {rows[-1].get('peak_mem_gib', 0):11.1f} {str('127.0.0.1: success' in log):>8}")
PY
