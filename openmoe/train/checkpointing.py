"""What a run saves and restores, on top of io/resumable.CheckpointManager: the model (gathered, logical expert
order), every rank's optimizer state (from the backend), the LR schedule, every rank's RNG, step and data position,
the router balancing biases (--balance_mode bias) and the expert placement (--load_balance); and the final HF export.
Every function here is collective over the world.

Resume is honest about the flags: the checkpoint records the run configuration (trainer_state.json "run"); a resume
lists every flag that differs and applies it (the LR schedule is rebuilt from the new lr / warmup / schedule / max_steps
at the saved step; intervals, loss weights, kernels and data options simply take effect), except the ones that shaped
the saved optimizer state and parallel layout, or the architecture, which are refused with one line before anything
is loaded.
"""

from __future__ import annotations

import inspect
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from openmoe.backend.colossal import load_optimizer_state_dict, optimizer_state_dict
from openmoe.config import OpenMoeConfig
from openmoe.io.hf import write_checkpoint
from openmoe.io.resumable import CheckpointError, CheckpointManager
from openmoe.parallel.gather import full_state_dict, load_model_weights, moe_layers
from openmoe.parallel.load_balance import BiasBalancer, ExpertPlacement, apply_placement
from openmoe.train.builder import TrainState, lr_lambda
from openmoe.train.config import RunConfig
from openmoe.train.reshard import LAYOUT, layout_key, load_resharded_optimizer, logical_ranges

PLACEMENT = "expert_placement"  # --load_balance: which expert each physical slot holds (ExpertPlacement)
ROUTER_BIAS = "router_bias"


def checkpoint_root(output_path: str) -> str:
    return os.path.join(output_path, "checkpoints")


def manager(state: TrainState, output_path: str | None = None) -> CheckpointManager:
    run = state.run
    return CheckpointManager(checkpoint_root(output_path or run.checkpoint.output_path), run.checkpoint.keep_last)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def logical_bias_state(balancer: BiasBalancer, placement: ExpertPlacement | None) -> dict:
    """The balancer's state with its per-expert biases in logical order (they follow the router rows when experts
    move; load_checkpoint moves them back with the rows)."""
    state = balancer.state_dict()
    if placement is not None:
        state["bias"] = torch.stack([placement.to_logical(b, layer) for layer, b in enumerate(state["bias"])])
    return state


def save_checkpoint(state: TrainState, step: int, output_path: str | None = None) -> str:
    """A resumable checkpoint of `state` at `step` under output_path (default: the run's). The model and the biases
    are written in the logical (published) expert order, the per-rank optimizer files in the physical one."""
    balancer, placement = state.balancer, state.placement
    shared = {"scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
              ROUTER_BIAS: logical_bias_state(balancer, placement) if balancer is not None else None,
              PLACEMENT: placement.state_dict() if placement is not None else None}
    return manager(state, output_path).save(
        step, config=state.cfg, model_state=full_state_dict(state.model, placement), shared=shared,
        per_rank={"optimizer": {**optimizer_state_dict(state.optimizer),
                                LAYOUT: logical_ranges(state.model, state.optimizer)}, "rng": rng_state()},
        trainer_state={"data": state.batches.state_dict() if state.batches is not None else None,
                       "run": state.run.to_dict()})


def load_checkpoint(state: TrainState, output_path: str | None = None, path: str | None = None
                    ) -> tuple[int, dict, str] | None:
    """Restore checkpoint `path` (default: the newest usable one) into `state`; returns (step, data position, path) or
    None. The model is loaded in the identity layout (each EP rank its contiguous experts), then, with --load_balance,
    moved into the saved expert placement; the optimizer files are physical."""
    mgr = manager(state, output_path)
    path = path or mgr.newest()
    if path is None:
        return None
    saved = mgr.read_trainer_state(path)
    check_architecture(state.cfg, OpenMoeConfig.load(mgr.model_dir(path)), path)
    load_model_weights(state.model.unwrap(), mgr.model_dir(path))
    old_world = saved["world_size"]
    if layout_key(saved["run"], old_world) == layout_key(state.run, dist.get_world_size()):
        load_optimizer_state_dict(state.optimizer, mgr.read_rank(path, "optimizer", state.rank))
    else:  # another parallel layout: the optimizer shards are read back by logical coordinates
        if mgr.read_shared(path, PLACEMENT) is not None:
            raise ValueError(f"checkpoint {path} was trained with --load_balance (experts moved between ranks); "
                             "it resumes only on the layout it was written with")
        files = [mgr.read_rank(path, "optimizer", r) for r in range(old_world)]
        load_resharded_optimizer(state.model, state.optimizer, files)
        if state.rank == 0:
            print(f"resharded {path}: written by {old_world} ranks, loaded onto {dist.get_world_size()}", flush=True)
    if state.scheduler is not None:
        state.scheduler.load_state_dict(mgr.read_shared(path, "scheduler"))
    if state.rank < old_world:  # a rank the old layout did not have keeps its freshly seeded generators
        set_rng_state(mgr.read_rank(path, "rng", state.rank))
    _load_balancing(state, mgr, path)
    return saved["step"], saved["data"], path


# Run options that a resume cannot change: they shaped the saved optimizer state (which parameters train, fp16's
# scaler, ZeRO's partition of gradients). The parallel layout itself (world size, plugin, ep/pp/extra-dp sizes) may
# change: the optimizer shards are then read back by logical coordinates (train/reshard.py).
FIXED_ON_RESUME = ("tp_size", "sp_size", "precision", "zero_stage", "trainable", "freeze_router", "num_shared_experts")
# Options of one invocation, not of the run.
NOT_COMPARED = ("output_path", "resume", "overwrite")
# OpenMoeConfig fields that the run may override (the loss weights); every other field is the architecture.
RUN_OVERRIDABLE = ("router_aux_loss_factor", "router_z_loss_factor", "label_smoothing", "z_loss_factor",
                   "router_aux_loss_type")


def changed_options(saved_run: dict, run: RunConfig, path: str) -> list[str]:
    """The options whose value differs from the checkpoint's run, as "--name old -> new"; ValueError (one line) when
    any of them cannot change on a resume."""
    saved = {k: v for section in saved_run.values() for k, v in section.items()}
    now = run.to_flat()
    changed = {k: (saved[k], v) for k, v in now.items() if k in saved and k not in NOT_COMPARED and saved[k] != v}
    fixed = [k for k in changed if k in FIXED_ON_RESUME]
    if fixed:
        was = ", ".join(f"--{k} {changed[k][0]}" for k in fixed)
        asked = ", ".join(f"--{k} {changed[k][1]}" for k in fixed)
        raise ValueError(f"--resume: checkpoint {path} was trained with {was}; this run asks for {asked}, which a "
                         "resume cannot change (the saved optimizer state and parallel layout depend on them); "
                         "resume with the checkpoint's values, or start a new run from its weights with "
                         f"--pretrained {os.path.join(path, 'model')}")
    return [f"--{k} {old} -> {new}" for k, (old, new) in changed.items()]


def check_architecture(cfg: OpenMoeConfig, saved: OpenMoeConfig, path: str) -> None:
    fields = [f for f in inspect.signature(OpenMoeConfig.__init__).parameters
              if f not in ("self", "kwargs") and f not in RUN_OVERRIDABLE]
    diff = [f"{f} {getattr(saved, f, None)} -> {getattr(cfg, f, None)}" for f in fields
            if getattr(saved, f, None) != getattr(cfg, f, None)]
    if diff:
        raise ValueError(f"--resume: checkpoint {path} holds another architecture ({'; '.join(diff)}); resume with "
                         "the checkpoint's --model_name/--pretrained, or start a new run")


def apply_schedule_changes(state: TrainState, step: int) -> None:
    """Rebuild the LR schedule at `step` from this run's options (lr, warmup_steps, lr_schedule, min_lr_ratio,
    max_steps/num_epochs): the loaded scheduler state carries the old base LR, and the loaded optimizer state the old
    LR and weight decay in its parameter groups. With unchanged options this reproduces the saved values exactly."""
    sched = state.scheduler
    if sched is None:
        return
    run = state.run
    f = lr_lambda(run, state.total_steps)
    sched.lr_lambdas = [f] * len(sched.lr_lambdas)
    sched.base_lrs = [run.optim.lr] * len(sched.base_lrs)
    lrs = [base * f(sched.last_epoch) for base in sched.base_lrs]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
        group["initial_lr"] = run.optim.lr
    sched.optimizer.param_groups[0]["weight_decay"] = run.optim.weight_decay  # group 1 (norms) never decays
    sched._last_lr = lrs


def _load_balancing(state: TrainState, mgr: CheckpointManager, path: str) -> None:
    balancer, placement = state.balancer, state.placement
    if balancer is not None:
        bias = mgr.read_shared(path, ROUTER_BIAS)
        if bias is None:
            raise ValueError(f"--balance_mode bias: checkpoint {path} holds no router biases (it was trained without "
                             "bias balancing)")
        balancer.load_state_dict(bias)  # logical order
    saved_placement = mgr.read_shared(path, PLACEMENT)
    if saved_placement is not None:
        if placement is None:
            raise ValueError(f"checkpoint {path} was trained with --load_balance (its experts moved between ranks); "
                             "resume it with --load_balance (any --load_balance_interval)")
        placement.load_state_dict(saved_placement)
    elif placement is not None:
        placement.reset()  # a checkpoint without a placement file: the identity placement
    if placement is not None:
        apply_placement(moe_layers(state.model), placement)  # weights, router rows, selection biases


def resume(state: TrainState) -> None:
    """--resume: continue from the newest complete checkpoint (step, data position and all state), or start fresh.
    Changed options are listed and applied, or refused before anything is loaded."""
    mgr = manager(state)
    path = mgr.newest()
    if path is None:
        if state.rank == 0:
            print(f"--resume: no complete checkpoint under {checkpoint_root(state.run.checkpoint.output_path)}; "
                  "starting fresh", flush=True)
        return
    saved = mgr.read_trainer_state(path)
    if saved["step"] > state.total_steps:
        limit = (f"--max_steps {state.run.optim.max_steps}" if state.run.optim.max_steps is not None else
                 f"--num_epochs {state.run.optim.num_epochs} ({state.total_steps} steps)")
        raise ValueError(f"--resume: checkpoint {path} is at step {saved['step']}, beyond {limit}; accepted: "
                         f"--max_steps >= {saved['step']}")
    changes = changed_options(saved["run"], state.run, path) if saved.get("run") else []
    state.start_step, state.data_state, path = load_checkpoint(state, path=path)
    apply_schedule_changes(state, state.start_step)
    state.batches.load_state_dict(state.data_state)
    if state.rank == 0:
        print(f"resumed from {path} at step {state.start_step}", flush=True)
        if changes:
            print(f"--resume: options changed since the checkpoint, applied from step {state.start_step + 1}: "
                  + "; ".join(changes), flush=True)


def export_hf(state: TrainState, directory: str) -> None:
    """Write an HF-format checkpoint (and the tokenizer) that `OpenMoeForCausalLM.from_pretrained` loads on one
    device."""
    sd = full_state_dict(state.model, state.placement)
    error = None
    if sd is not None:
        try:
            # the tokenizer export (training's encoding, chat template) inside the same atomic directory
            write_checkpoint(directory, state.cfg, sd, tokenizer=state.tokenizer)
        except OSError as e:  # e.g. a full disk: one line; atomic_directory left the previous export in place
            error = f"writing the HF-format export {directory} failed: {e.strerror or e}"
    box = [error]
    dist.broadcast_object_list(box, src=0)  # rank 0 writes (full_state_dict is None elsewhere)
    if box[0] is not None:
        raise CheckpointError(box[0])
