"""Train OpenMoE with expert parallelism on ColossalAI.

    colossalai run --nproc_per_node 2 train.py                                    # tiny model, sample data, ep
    colossalai run --nproc_per_node 8 train.py --model_name 8b --plugin ep_zero --extra_dp_size 2 \
        --dataset yizhongw/self_instruct --task_name super_natural_instructions --tokenizer PATH_TO_UMT5
    colossalai run --nproc_per_node 4 train.py --plugin hybrid --pp_size 2 --ep_size 2 --microbatch_size 2
    colossalai run --nproc_per_node 8 --hostfile hostfile train.py ...            # several nodes (ssh, see README)
    colossalai run --nproc_per_node 2 train.py --resume                           # continue the newest checkpoint

See `python train.py --help` for every option; `--config FILE` takes the same keys as JSON/YAML.
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist

from openmoe.backend.colossal import init_distributed
from openmoe.io.resumable import CheckpointError
from openmoe.train.builder import build
from openmoe.train.checkpointing import checkpoint_root, export_hf
from openmoe.train.config import parse_args
from openmoe.train.evaluate import evaluate
from openmoe.train.lock import claim_output_dir, remove_earlier_run
from openmoe.train.lora import export_lora
from openmoe.train.trainer import Preempted, Trainer, TrainingStopped, tolerate_closed_output


def run_training(argv) -> None:
    run = parse_args(argv)
    if run.data.eval_only:
        return run_evaluation(run)
    init_distributed(run.optim.seed, run.parallel.dist_timeout)
    out = run.checkpoint.output_path
    ck = run.checkpoint
    lock = claim_output_dir(out, resume=ck.resume, overwrite=ck.overwrite, inputs={
        "--pretrained": run.model.pretrained, "--tokenizer": run.model.tokenizer, "--model_name": run.model.model_name})
    try:
        state = build(run)
        remove_earlier_run(out, resume=ck.resume, overwrite=ck.overwrite)  # only now: every input has been checked
        Trainer(state).train()
        if run.lora.lora_rank:
            export_lora(state, out)  # adapter/ (PEFT), and hf/ merged with --merge_lora
        else:
            export_hf(state, f"{out}/hf")
    finally:
        if lock is not None:
            lock.release()
    if state.rank == 0:
        print(f"done: {state.total_steps} steps; resumable checkpoint under {checkpoint_root(out)}, "
              f"HF-format model in {out}/hf, metrics in {os.path.join(out, 'metrics.jsonl')}", flush=True)


def run_evaluation(run) -> None:
    """--eval_only: the eval loss of --pretrained (or, with --resume, of the newest checkpoint); no checkpoint or
    export is written."""
    state = build(run)
    metrics = evaluate(state)
    if state.rank == 0:
        print(f"eval: loss {metrics['eval_loss']:.4f}, ppl {metrics['eval_ppl']:.2f}, router aux "
              f"{metrics['eval_aux_loss']:.4f}, z {metrics['eval_router_z_loss']:.5f} over {metrics['eval_tokens']} "
              f"tokens", flush=True)


def main(argv=None) -> int:
    tolerate_closed_output()
    try:
        run_training(argv)
    except Preempted as e:
        print(f"[rank {dist.get_rank()}] {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except (ValueError, FileNotFoundError, NotImplementedError, TrainingStopped, CheckpointError) as e:
        # One clear line per bad input, from every rank that hit it: the launcher may kill the other ranks as soon as
        # the first one exits, so rank 0 cannot be relied on to report a check that failed elsewhere first.
        where = f"[rank {dist.get_rank()}] " if dist.is_initialized() else ""
        print(f"{where}error: {e}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as e:
        if "Timed out" not in str(e):
            raise
        # --dist_timeout: a collective waited that long for a rank that hangs or died (gloo; NCCL's watchdog aborts)
        print(f"[rank {dist.get_rank()}] error: a collective timed out (--dist_timeout): another rank hangs or died; "
              f"{str(e).splitlines()[0]}", file=sys.stderr, flush=True)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
