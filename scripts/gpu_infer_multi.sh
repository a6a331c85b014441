#!/usr/bin/env bash
# Multi-GPU inference figures (issue 18) and the single-GPU decode default, on the lent 2 x H200 machine, from the
# project root with .whl/ present:
#   source scripts/offline_env.sh && bash scripts/gpu_infer_multi.sh
# 1. expert parallel over 2 GPUs (python -m torch.distributed.run, i.e. torchrun), OpenMoE-8B and -34B shapes, random weights, batch 1 and 16
#    -> infer_multi_gpu_ep.json
# 2. the same through a device map over 2 GPUs (accelerate's placement, as --device_map auto)
#    -> infer_multi_gpu_device_map.json
# 3. infer.py on one GPU (tiny, fp32): the default (fast decoder, compiled) prints what --decode eager --dropless
#    prints; model.generate's default route on CUDA against fast_decode=False
# 4. colossalai run --nproc_per_node 2 infer.py --ep_size 2 (tiny, dropless) prints what one process prints
# Everything else goes to log.txt. Each step has its own time limit so that the later ones still run.
set -uo pipefail
LOGS=${OUT:-outputs/gpu-infer-multi}
mkdir -p "$LOGS"
LOG="$LOGS/log.txt"
export TORCHINDUCTOR_COMPILE_THREADS=16
{ date -u; git log -1 --format=%H 2>/dev/null; nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} >> "$LOG" 2>&1
bench=(benchmark/infer_multi_gpu_bench.py --models 8b 34b --batch_sizes 1 16 --prompt_len 128 --new_tokens 32
       --short_tokens 8 --warmup 1 --out "$LOGS")

echo "== 1. expert parallel, torchrun x2 $(date -u +%T)" >> "$LOG"
timeout 170 python3 -m torch.distributed.run --nproc_per_node 2 --master_port 29661 "${bench[@]}" --mode ep >> "$LOG" 2>&1
echo "exit $?" >> "$LOG"

echo "== 2. device map over 2 GPUs $(date -u +%T)" >> "$LOG"
timeout 150 python3 "${bench[@]}" --mode device_map >> "$LOG" 2>&1
echo "exit $?" >> "$LOG"

echo "== 3. infer.py on one GPU: default (fast, compiled) vs --decode eager --dropless, tiny fp32 $(date -u +%T)" >> "$LOG"
printf 'Write the word in capital letters.\\n\\nInput: ocean\\n\\nOutput:\nReverse the word: apple.\nSort the numbers: 5, 2, 9\nHello\n' > /tmp/prompts.txt
one=(infer.py --model tiny --prompt_file /tmp/prompts.txt --max_new_tokens 24 --dtype fp32)
for mode in default eager; do
  extra=(); [ "$mode" = eager ] && extra=(--decode eager --dropless)
  t0=$SECONDS
  CUDA_VISIBLE_DEVICES=0 timeout 120 python3 "${one[@]}" "${extra[@]}" > "/tmp/one_$mode.txt" 2>> "$LOG"
  echo "infer.py $mode: exit $?, $((SECONDS - t0)) s" >> "$LOG"
done
cat /tmp/one_default.txt >> "$LOG"
if cmp -s /tmp/one_default.txt /tmp/one_eager.txt; then echo "default == eager: yes" >> "$LOG"
else echo "default == eager: NO" >> "$LOG"; diff /tmp/one_default.txt /tmp/one_eager.txt >> "$LOG"; fi
CUDA_VISIBLE_DEVICES=0 timeout 90 python3 - >> "$LOG" 2>&1 <<'PY'
import time
import torch
from openmoe import ModelOptions, OpenMoeForCausalLM, preset
torch.manual_seed(0)
model = OpenMoeForCausalLM(preset("tiny"), options=ModelOptions(dropless=True)).cuda().eval()
ids = torch.randint(3, 700, (2, 20), device="cuda")
ids[:, 0] = 0
kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
want = model.generate(ids, fast_decode=False, **kw)
for i in range(2):
    t0 = time.perf_counter()
    got = model.generate(ids, **kw)  # the default on CUDA: the fast route, compiled
    torch.cuda.synchronize()
    print(f"model.generate default call {i}: {time.perf_counter() - t0:.2f} s")
cached = model.__dict__.get("_openmoe_fast_decoder")
print("fast route taken:", cached is not None, "| compiled:", cached and cached[0][2],
      "| tokens equal to fast_decode=False:", (got == want).float().mean().item(), "shape", tuple(got.shape))
PY

echo "== 4. colossalai run --nproc_per_node 2 infer.py --ep_size 2 (tiny, bf16, dropless) vs one process $(date -u +%T)" >> "$LOG"
ep=(infer.py --model tiny --prompt_file /tmp/prompts.txt --max_new_tokens 24 --dtype bf16 --dropless)
CUDA_VISIBLE_DEVICES=0 timeout 60 python3 "${ep[@]}" --decode eager > /tmp/ep_single.txt 2>> "$LOG"
timeout 90 colossalai run --nproc_per_node 2 --master_port 29662 "${ep[@]}" --ep_size 2 > /tmp/ep.raw 2>> "$LOG"
echo "colossalai run exit $?" >> "$LOG"
awk '/^====== /{exit} {print}' /tmp/ep.raw | sed -e :a -e '/^\n*$/{$d;N;ba' -e '}' > /tmp/ep.txt  # drop its report
if cmp -s /tmp/ep_single.txt /tmp/ep.txt; then echo "colossalai EP == one process: yes" >> "$LOG"
else echo "colossalai EP == one process: NO" >> "$LOG"; diff /tmp/ep_single.txt /tmp/ep.txt | head -20 >> "$LOG"; fi
echo "== done $(date -u +%T)" >> "$LOG"
grep -E "^(8b|34b) |default == |fast route|colossalai EP|^exit|infer.py (default|eager)" "$LOG"
