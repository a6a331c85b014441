#!/usr/bin/env bash
# LoRA against full fine-tuning on ONE GPU (issue 17), OpenMoE-8B shapes, through benchmark/train_bench.py:
#   source scripts/offline_env.sh && OUT=/tmp/lora bash scripts/gpu_lora_bench.sh
# Rows: the 2-layer 8B shape (both layers MoE) full fine-tuning vs LoRA rank 16 at the same step (4 x 2,048 tokens),
# and the full-depth 8B (24 layers, 11.9B parameters; full fine-tuning does not fit one GPU) with LoRA rank 16 and
# activation checkpointing. (Recorded 2026-11-30: the 2-layer rows then ran the full depth, see benchmark/RESULTS.md.)
# Needs peft (and accelerate) in the wheel bundle .whl/; the GPU image's bitsandbytes is a stub without `nn`, so
# peft is told bitsandbytes is absent (PEFT_NO_BNB=1 patches the bundle's installed copy under /tmp/site only).
set -uo pipefail
OUT=${OUT:-outputs/lora-bench}
mkdir -p "$OUT"
if [ "${PEFT_NO_BNB:-1}" = 1 ] && [ -f /tmp/site/peft/import_utils.py ]; then
  sed -i 's/return importlib.util.find_spec("bitsandbytes") is not None/return False/' /tmp/site/peft/import_utils.py
fi
common=(--kind ours --out "$OUT" --model 8b --seq 2048 --use_kernel --dropless --warmup 1 --steps 3 --profile_steps 0)
run() {
  local name=$1
  shift
  timeout "${ROW_TIMEOUT_S:-200}" python3 -m torch.distributed.run --standalone --nproc_per_node 1 \
    benchmark/train_bench.py --name "$name" "${common[@]}" "$@" > "$OUT/$name.log" 2>&1 || echo "$name: failed"
  tail -n 1 "$OUT/$name.log"
}
run 8bL2-full --moe_layer_interval 1 --layers 2 --batch_size 4
run 8bL2-lora16 --moe_layer_interval 1 --layers 2 --batch_size 4 --lora_rank 16
run 8b24-lora16-ac --batch_size 4 --lora_rank 16 --activation_checkpointing
