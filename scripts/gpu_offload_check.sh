#!/usr/bin/env bash
# GPU check of --offload_optimizer through `colossalai run` (tiny OpenMoE, plugin ep, bf16, NCCL), on the lent GPU
# machine from the project root with the offline wheel bundle in .whl/:
#   source scripts/offline_env.sh && OUT=DIR bash scripts/gpu_offload_check.sh [NPROC]
# Three runs of 40 steps (checkpoints at 20 and 40): A with the optimizer state in host memory, B with it on the GPU
# (colossalai's ZeRO-1 step, --no-lean_zero: the same arithmetic with CUDA's fused AdamW), C = A killed after its
# step-20 checkpoint and resumed with --resume. Then a table: A's losses against B's and C's, and where A's masters
# lived. Logs and metrics under $OUT.
set -uo pipefail
NPROC=${1:-2}
LOGS=${OUT:-outputs/gpu-offload-check}
mkdir -p "$LOGS"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$LOGS/gpus.txt"
common=(--model_name tiny --tokenizer tests/assets/tokenizer --plugin ep --no-tensorboard --log_interval 1
        --max_steps 40 --save_interval 20 --keep_last 5)
run() {  # name, extra args...
  local name=$1; shift
  colossalai run --nproc_per_node "$NPROC" --master_port $((29700 + RANDOM % 200)) train.py "${common[@]}" \
    --output_path "/tmp/offload-$name" "$@" > "$LOGS/$name.log" 2>&1
  echo "$name exit=$? $(grep -c '127.0.0.1: success' "$LOGS/$name.log") success line(s)" | tee -a "$LOGS/summary.txt"
  cp "/tmp/offload-$name/metrics.jsonl" "$LOGS/$name.metrics.jsonl" 2>/dev/null
}
rm -rf /tmp/offload-A /tmp/offload-B /tmp/offload-C
run A --offload_optimizer
run B --no-lean_zero
# C: A as if killed right after its step-20 checkpoint, then resumed
cp -r /tmp/offload-A /tmp/offload-C && rm -rf /tmp/offload-C/checkpoints/step-00000040 /tmp/offload-C/hf
head -n 20 /tmp/offload-A/metrics.jsonl > /tmp/offload-C/metrics.jsonl
run C --offload_optimizer --resume
python3 - "$LOGS" <<'PY'
import json, os, sys
logs = sys.argv[1]
load = lambda n: [json.loads(l) for l in open(os.path.join(logs, f"{n}.metrics.jsonl"))]
a, b, c = load("A"), load("B"), load("C")
log_a = open(os.path.join(logs, "A.log")).read()
step_line = [l for l in log_a.splitlines() if "optimizer step:" in l][:1]
rel = lambda x, y: abs(x - y) / abs(y)
print("A's setup line:", step_line[0].split("optimizer step:")[1].strip() if step_line else "MISSING")
print(f"{'run':28} {'steps':>5} {'loss 1-3':>9} {'loss 38-40':>10} {'max rel. diff vs A':>18} {'peak GiB r0':>11}")
for name, rows in (("A offload", a), ("B state on GPU", b), ("C A resumed at 20", c)):
    d = max((rel(r["loss"], q["loss"]) for r, q in zip(rows[20:] if name[0] == "C" else rows, a[20:] if name[0] == "C" else a)), default=float("nan"))
    print(f"{name:28} {len(rows):5d} {sum(r['loss'] for r in rows[:3]) / 3:9.3f} {sum(r['loss'] for r in rows[-3:]) / 3:10.3f} "
          f"{d:18.2e} {rows[-1].get('peak_mem_gib', 0):11.2f}")
PY
