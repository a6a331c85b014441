"""What a run saves and restores, on top of io/resumable.CheckpointManager: the model (gathered, logical expert
order), every rank's optimizer state (from the backend), the LR schedule, every rank's RNG, step and data position,
the router balancing biases (--balance_mode bias) and the expert placement (--load_balance); and the final HF export.
Every function here is collective over the world.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist

from openmoe.backend.colossal import load_optimizer_state_dict, optimizer_state_dict
from openmoe.io.hf import write_checkpoint
from openmoe.io.resumable import CheckpointManager
from openmoe.parallel.gather import full_state_dict, load_model_weights, moe_layers
from openmoe.parallel.load_balance import BiasBalancer, ExpertPlacement, apply_placement
from openmoe.train.builder import TrainState

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
        per_rank={"optimizer": optimizer_state_dict(state.optimizer), "rng": rng_state()},
        trainer_state={"data": state.batches.state_dict() if state.batches is not None else None,
                       "run": state.run.to_dict()})


def load_checkpoint(state: TrainState, output_path: str | None = None) -> tuple[int, dict, str] | None:
    """Restore the newest usable checkpoint into `state`; returns (step, data position, path) or None. The model is
    loaded in the identity layout (each EP rank its contiguous experts), then, with --load_balance, moved into the
    saved expert placement; the optimizer files are physical."""
    mgr = manager(state, output_path)
    path = mgr.newest()
    if path is None:
        return None
    saved = mgr.read_trainer_state(path)
    if saved["world_size"] != dist.get_world_size():
        raise ValueError(f"checkpoint {path} was written by {saved['world_size']} ranks; this run has "
                         f"{dist.get_world_size()} (resume needs the same parallel layout)")
    load_model_weights(state.model.unwrap(), mgr.model_dir(path))
    load_optimizer_state_dict(state.optimizer, mgr.read_rank(path, "optimizer", state.rank))
    if state.scheduler is not None:
        state.scheduler.load_state_dict(mgr.read_shared(path, "scheduler"))
    set_rng_state(mgr.read_rank(path, "rng", state.rank))
    _load_balancing(state, mgr, path)
    return saved["step"], saved["data"], path


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
    """--resume: continue from the newest complete checkpoint (step, data position and all state), or start fresh."""
    resumed = load_checkpoint(state)
    if resumed is not None:
        state.start_step, state.data_state, path = resumed
        state.batches.load_state_dict(state.data_state)
        if state.rank == 0:
            print(f"resumed from {path} at step {state.start_step}", flush=True)
    elif state.rank == 0:
        print(f"--resume: no complete checkpoint under {checkpoint_root(state.run.checkpoint.output_path)}; "
              "starting fresh", flush=True)


def export_hf(state: TrainState, directory: str) -> None:
    """Write an HF-format checkpoint (and the tokenizer) that `OpenMoeForCausalLM.from_pretrained` loads on one
    device."""
    sd = full_state_dict(state.model, state.placement)
    if sd is not None:
        write_checkpoint(directory, state.cfg, sd)
        if state.tokenizer is not None:
            state.tokenizer.save_pretrained(directory)
    dist.barrier()
