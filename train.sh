#!/usr/bin/env bash
# Train OpenMoE with `colossalai run`. One configuration, chosen by variables; installs first (idempotent).
#   bash train.sh                                   # tiny model, shipped sample data, plugin ep, 2 processes
#                                                   # (CPU over gloo; on a GPU machine the same command uses 2 GPUs)
#   MODEL=8b PLUGIN=ep_zero EXTRA_DP_SIZE=2 NPROC=8 TOKENIZER=/path/to/umt5 \
#     DATASET=yizhongw/self_instruct TASK_NAME=super_natural_instructions BATCH_SIZE=4 MAX_LENGTH=2048 bash train.sh
#   HOSTFILE=hostfile NPROC=8 ... bash train.sh     # several nodes (passwordless ssh, same path on every host)
# Anything else: EXTRA_ARGS="--lr 1e-4 --resume" (see `python train.py --help`).
# Runs colossalai run through openmoe/launch.py: SIGTERM/SIGINT to this script reach the training ranks, which save a
# checkpoint and exit (continue with --resume); nothing is left running; secrets never reach the log; torchrun's
# failure wall is one line (OPENMOE_DEBUG=1 shows it); a dead host ends a HOSTFILE run after PET_RDZV_CONF's timeout
# (default timeout=60). OUTPUT_PATH belongs to one run: rerun with EXTRA_ARGS=--resume (or --overwrite).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install.sh >/dev/null
export PATH="$PWD/.venv/bin:$PATH"
MODEL=${MODEL:-tiny}
PLUGIN=${PLUGIN:-ep}
NPROC=${NPROC:-2}
EXTRA_DP_SIZE=${EXTRA_DP_SIZE:-1}
ZERO_STAGE=${ZERO_STAGE:-1}
PRECISION=${PRECISION:-bf16}
BATCH_SIZE=${BATCH_SIZE:-4}
MAX_LENGTH=${MAX_LENGTH:-64}
DATASET=${DATASET:-data/sample/train.jsonl}
TOKENIZER=${TOKENIZER:-}   # default: the model's own; the shipped test tokenizer is used for MODEL=tiny only
OUTPUT_PATH=${OUTPUT_PATH:-outputs/${MODEL}-${PLUGIN}}
MASTER_PORT=${MASTER_PORT:-29500}
args=(--model_name "$MODEL" --plugin "$PLUGIN" --zero_stage "$ZERO_STAGE" --precision "$PRECISION"
      --batch_size "$BATCH_SIZE" --max_length "$MAX_LENGTH" --dataset "$DATASET" --output_path "$OUTPUT_PATH")
[ -n "$TOKENIZER" ] && args+=(--tokenizer "$TOKENIZER")
[ "$PLUGIN" = ep_zero ] && args+=(--extra_dp_size "$EXTRA_DP_SIZE")
[ -n "${TASK_NAME:-}" ] && args+=(--task_name "$TASK_NAME")
[ -n "${PP_SIZE:-}" ] && args+=(--pp_size "$PP_SIZE")
[ -n "${EP_SIZE:-}" ] && args+=(--ep_size "$EP_SIZE")
hosts=()
if [ -n "${HOSTFILE:-}" ]; then
  # colossalai's own parser takes comments for host names: check the file and pass the clean form
  clean=$(mktemp)
  python -m openmoe.hostfile "$HOSTFILE" --ssh_port "${SSH_PORT:-22}" > "$clean"  # also: every remote sshd answers
  first=$(head -n 1 "$clean")
  hosts=(--hostfile "$clean" --master_addr "${MASTER_ADDR:-$first}" --ssh-port "${SSH_PORT:-22}")
fi
# EXTRA_ARGS is read as shell words: EXTRA_ARGS="--system_prompt 'Be brief.'" passes one value with a space
eval "extra=(${EXTRA_ARGS:-})"
exec python -m openmoe.launch --nproc_per_node "$NPROC" --master_port "$MASTER_PORT" "${hosts[@]}" train.py "${args[@]}" "${extra[@]}"
