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
import time

import torch
import torch.distributed as dist

from openmoe import trainer
from openmoe.metrics import MetricsWriter
from openmoe.parallel.load_balance import check_load_balance
from openmoe.parallel.plugins import build_plugin, fix_grad_clipping, resolve_sizes
from openmoe.run_config import TrainConfig, parse_args


def log_step(writer, bar, step, stats, lr, grad_norm, tok_per_s, moves=None):
    record = {"loss": stats.loss, "ce_loss": stats.ce_loss, "z_loss": stats.z_loss, "aux_loss": stats.aux_loss,
              "router_z_loss": stats.router_z_loss, "lr": lr, "tokens": stats.tokens, "tokens_per_s": tok_per_s,
              "dropped_fraction": stats.dropped_fraction, "tokens_per_expert": stats.tokens_per_expert}
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    if moves is not None:
        record.update(rebalance_record(moves))
    if torch.cuda.is_available():
        record["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30  # rank 0
    writer.log(step, record)
    bar.set_postfix(loss=f"{stats.loss:.3f}", aux=f"{stats.aux_loss:.4f}", z=f"{stats.z_loss:.3f}",
                    lr=f"{lr:.2e}", tok_s=f"{tok_per_s:.0f}", refresh=False)


def rebalance_record(moves) -> dict:
    """--load_balance: per MoE layer the EP-rank loads (tokens routed since the previous rebalance) under the old and
    the new placement and the experts swapped; plus scalars (worst layer's max/mean rank load) for TensorBoard."""
    return {"rebalance": [{"layer": m.layer, "rank_loads_before": m.rank_loads_before,
                           "rank_loads_after": m.rank_loads_after, "swaps": m.swaps} for m in moves],
            "rank_load_max_over_mean_before": max(m.max_over_mean(m.rank_loads_before) for m in moves),
            "rank_load_max_over_mean_after": max(m.max_over_mean(m.rank_loads_after) for m in moves),
            "expert_swaps": sum(len(m.swaps) for m in moves)}


def run_training(run: TrainConfig) -> None:
    from colossalai.booster import Booster
    from tqdm import tqdm

    rank, world, device = trainer.init_distributed(run.seed)
    cfg = trainer.model_config(run)
    sizes = resolve_sizes(run, cfg, world)
    check_load_balance(run, sizes)
    trainer.check_output_path(run.output_path)
    plugin = build_plugin(run, sizes)
    tokenizer, batches = trainer.build_data(run, cfg, dist.get_rank(plugin.dp_group), sizes.dp)
    steps_per_epoch = len(batches) // run.grad_accum
    total_steps = run.max_steps or run.num_epochs * steps_per_epoch
    model = trainer.build_model(run, cfg)
    optimizer, scheduler = trainer.build_optimizer(run, model, total_steps)
    booster = Booster(plugin=plugin)
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, lr_scheduler=scheduler)
    fix_grad_clipping(optimizer)
    balancer = trainer.attach_bias_balancer(model, cfg, run, device) if run.balance_mode == "bias" else None
    placement = trainer.build_placement(model, cfg, sizes.ep) if run.load_balance else None

    start = 0
    if run.resume:
        resumed = trainer.load_resumable(model, optimizer, scheduler, run, balancer, placement)
        if resumed is not None:
            start, data_state, path = resumed
            batches.load_state_dict(data_state)
            if rank == 0:
                print(f"resumed from {path} at step {start}", flush=True)
        elif rank == 0:
            print(f"--resume: no complete checkpoint under {trainer.checkpoint_root(run)}; starting fresh", flush=True)
    writer = MetricsWriter(run.output_path, run.tensorboard) if rank == 0 else None
    bar = tqdm(total=total_steps, initial=start, disable=rank != 0, desc="train", dynamic_ncols=True)
    if rank == 0:
        pipeline = f" in {sizes.num_microbatches} micro-batches" if sizes.pp > 1 else ""
        print(f"plugin {run.plugin}: world {world}, ep {sizes.ep}, pp {sizes.pp}, moe_dp {sizes.moe_dp}, "
              f"dp {sizes.dp}; {total_steps} steps of {run.batch_size}x{run.grad_accum}x{sizes.dp} examples"
              f"{pipeline}", flush=True)
    model.train()
    it, clock, bad = iter(batches), trainer.Throughput(), 0
    poison_steps, poison_grad_steps = fault_nan_steps("OPENMOE_FAULT_NAN_STEPS"), fault_nan_steps(
        "OPENMOE_FAULT_NAN_GRAD_STEPS")
    for step in range(start + 1, total_steps + 1):
        fault_hooks(rank, step)
        outs, applied = trainer.train_step(model, booster, optimizer, it, run.grad_accum, device,
                                           poison=step in poison_steps, check_grads=run.precision == "bf16",
                                           poison_grad=step in poison_grad_steps)
        bad = 0 if applied else bad + 1
        if not applied:
            if rank == 0:
                print(f"\nwarning: step {step}: non-finite loss or gradient; step skipped ({bad} in a row)",
                      flush=True)
            if bad >= run.max_bad_steps:
                raise trainer.TrainingStopped(f"stopping: {bad} consecutive steps with a non-finite loss (--max_bad_steps "
                                   f"{run.max_bad_steps}); the last checkpoint under {trainer.checkpoint_root(run)} "
                                   "is untouched")
            bar.update(1)
            continue
        scheduler.step()
        trainer.count_expert_load(outs, device, balancer, placement)
        logging = step % run.log_interval == 0 or step == total_steps
        stats = trainer.reduce_stats(outs, cfg, device, placement) if logging else None  # this step's placement
        moves = None
        if placement is not None and step % run.load_balance_interval == 0 and step != total_steps:
            moves = trainer.rebalance_experts(model, optimizer, placement)
        if rank == 0:
            if logging:
                log_step(writer, bar, step, stats, scheduler.get_last_lr()[0], optimizer.get_grad_norm(),
                         clock.update(stats.tokens * run.log_interval), moves)
            elif moves is not None:
                writer.log(step, rebalance_record(moves))
            if moves is not None:
                print(f"\nstep {step}: expert rebalance: "
                      + "; ".join(m.describe(placement.layer_names[m.layer]) for m in moves), flush=True)
        bar.update(1)
        if run.save_interval and step % run.save_interval == 0 and step != total_steps:
            trainer.save_resumable(model, optimizer, scheduler, cfg, run, step, batches.state_dict(), balancer,
                                   placement)
    bar.close()
    trainer.save_resumable(model, optimizer, scheduler, cfg, run, total_steps, batches.state_dict(), balancer,
                           placement)
    trainer.export_hf(model, cfg, tokenizer, f"{run.output_path}/hf", placement)
    if rank == 0:
        writer.close()
        print(f"done: {total_steps} steps; resumable checkpoint under {trainer.checkpoint_root(run)}, "
              f"HF-format model in {run.output_path}/hf, metrics in {writer.path}", flush=True)


def fault_nan_steps(variable: str) -> set[int]:
    """Fault injection for tests: OPENMOE_FAULT_NAN_STEPS="3,4" makes those steps' loss NaN,
    OPENMOE_FAULT_NAN_GRAD_STEPS one gradient element (the loss stays finite)."""
    spec = os.environ.get(variable, "")
    return {int(s) for s in spec.split(",") if s.strip()}


def fault_hooks(rank: int, step: int) -> None:
    """Fault injection for tests: OPENMOE_FAULT_RAISE_AT="RANK:STEP" raises there; OPENMOE_FAULT_SLOW_STEP_S sleeps
    each step (so a test can kill the job mid-run)."""
    spec = os.environ.get("OPENMOE_FAULT_RAISE_AT")
    if spec and tuple(map(int, spec.split(":"))) == (rank, step):
        raise RuntimeError(f"injected failure on rank {rank} at step {step}")
    if os.environ.get("OPENMOE_FAULT_SLOW_STEP_S"):
        time.sleep(float(os.environ["OPENMOE_FAULT_SLOW_STEP_S"]))


def main(argv=None) -> int:
    run = parse_args(argv)
    try:
        run_training(run)
    except (ValueError, FileNotFoundError, NotImplementedError, trainer.TrainingStopped) as e:
        # One clear line per bad input, from every rank that hit it: the launcher may kill the other ranks as soon as
        # the first one exits, so rank 0 cannot be relied on to report a check that failed elsewhere first.
        where = f"[rank {dist.get_rank()}] " if dist.is_initialized() else ""
        print(f"{where}error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
