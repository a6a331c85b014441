#!/usr/bin/env bash
# LoRA against full fine-tuning on ONE GPU (issue 17), OpenMoE-8B shapes, through benchmark/train_bench.py:
#   source scripts/offline_env.sh && OUT=/tmp/lora bash scripts/gpu_lora_bench.sh
# Rows: the 4-layer 8B shape (every layer MoE) full fine-tuning vs LoRA rank 16 at the same step (4 x 2,048 tokens),
# and the full-depth 8B (24 layers, 11.9B parameters; full fine-tuning does not fit one GPU) with LoRA rank 16.
# Needs peft (and accelerate) in the wheel bundle .whl/.
set -uo pipefail
OUT=${OUT:-outputs/lora-bench}
mkdir -p "$OUT"
common=(--kind ours --out "$OUT" --model 8b --seq 2048 --use_kernel --dropless --warmup 2 --steps 4 --profile_steps 0)
run() {
  local name=$1
  shift
  timeout "${ROW_TIMEOUT_S:-200}" python3 -m torch.distributed.run --standalone --nproc_per_node 1 \
    benchmark/train_bench.py --name "$name" "${common[@]}" "$@" > "$OUT/$name.log" 2>&1 || echo "$name: failed"
  tail -n 1 "$OUT/$name.log"
}
run 8bL4-full --moe_layer_interval 1 --layers 4 --batch_size 4
run 8bL4-lora16 --moe_layer_interval 1 --layers 4 --batch_size 4 --lora_rank 16
run 8b24-lora16 --batch_size 2 --lora_rank 16
