#!/usr/bin/env bash
# GPU inference checks, then a table. On the lent 2-GPU machine, from the project root with .whl/ present:
#   source scripts/offline_env.sh && bash scripts/gpu_infer_check.sh
# 1. decode throughput of `base` (random weights, bf16) on ONE GPU, batch 1 and 8 (benchmark/infer_bench.py)
# 2. the same greedy outputs from: one GPU, --device_map auto over 2 GPUs, and expert parallel over 2 GPUs
set -uo pipefail
LOGS=${OUT:-outputs/gpu-infer}
mkdir -p "$LOGS"
CUDA_VISIBLE_DEVICES=0 python3 benchmark/infer_bench.py --model base --batch_sizes 1 8 --out "$LOGS" 2>&1 | grep -v Warn | tee "$LOGS/bench.txt"
python3 - <<'PY'
import torch
from openmoe import OpenMoeForCausalLM, preset
torch.manual_seed(0)
OpenMoeForCausalLM(preset("base")).to(torch.bfloat16).save_pretrained("/tmp/base-random")
PY
printf 'Write the word in capital letters.\\n\\nInput: ocean\\n\\nOutput:\nReverse the word: apple.\nSort the numbers: 5, 2, 9\nHello\n' > /tmp/prompts.txt
common=(--model /tmp/base-random --prompt_file /tmp/prompts.txt --max_new_tokens 24 --dtype bf16 --dropless)
CUDA_VISIBLE_DEVICES=0 python3 infer.py "${common[@]}" > "$LOGS/single.txt" 2> "$LOGS/single.err"
python3 infer.py "${common[@]}" --device_map auto --max_memory 0=1GiB,1=10GiB,cpu=50GiB > "$LOGS/device_map.txt" 2> "$LOGS/device_map.err"
colossalai run --nproc_per_node 2 --master_port 29650 infer.py "${common[@]}" --ep_size 2 > "$LOGS/ep.raw" 2> "$LOGS/ep.err"
# keep the script's own output: colossalai run appends its "====== ... Nodes" report
awk '/^====== /{exit} {print}' "$LOGS/ep.raw" | sed -e :a -e '/^\n*$/{$d;N;ba' -e '}' > "$LOGS/ep.txt"
for f in device_map ep; do
  if cmp -s "$LOGS/single.txt" "$LOGS/$f.txt"; then echo "$f == single-GPU output: yes"; else echo "$f == single-GPU output: NO"; diff "$LOGS/single.txt" "$LOGS/$f.txt" | head -8; fi
done | tee "$LOGS/compare.txt"
grep -c "=== " "$LOGS/single.txt"
