"""One optimizer step: forward/backward over the step's micro-batches, the finiteness vote, the optimizer step, and
the statistics reduced for logging. Shapes: B rows, S tokens per row, E experts."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from openmoe.backend.colossal import (
    defers_reduction,
    folds_finite_check,
    is_pipeline,
    local_gradients,
    step_unless_nonfinite,
)
from openmoe.config import OpenMoeConfig
from openmoe.parallel.load_balance import BiasBalancer, ExpertPlacement


@dataclass
class StepStats:
    loss: float
    ce_loss: float
    z_loss: float
    aux_loss: float
    router_z_loss: float
    tokens: int
    tokens_per_expert: list  # [moe layers][E], summed over ranks
    dropped_fraction: float


def reduce_stats(outs, cfg: OpenMoeConfig, device, placement: ExpertPlacement | None = None) -> StepStats:
    """Average loss parts over the ranks that hold outputs, sum token counts over them. One all-reduce per logged step.
    With a placement (--load_balance) the per-expert counts are reported per logical expert, not per physical slot.

    Without a pipeline every rank holds outputs; with one only the last stage does (its outputs carry every MoE
    layer's statistics, see openmoe/parallel/pipeline.py), and the other ranks contribute zeros and are not counted.
    """
    parts = ("loss", "ce_loss", "z_loss", "aux_loss", "router_z_loss")
    n, moe_shape = len(parts), (cfg.num_moe_layers, cfg.num_experts)
    flat = torch.zeros(n + 2 + moe_shape[0] * moe_shape[1] + 1, dtype=torch.float64)
    if outs:
        flat[:n] = torch.tensor([[getattr(o, p).item() for p in parts] for o in outs], dtype=torch.float64).mean(0)
        flat[n] = float(sum(int(o.num_tokens) for o in outs))
        flat[n + 1] = 1.0  # this rank counts
        moe = torch.stack([torch.stack([m.tokens_per_expert.double().cpu() for m in o.moe]) for o in outs]).sum(0)
        flat[n + 2:-1] = moe.flatten()  # [num_moe_layers * E]
        flat[-1] = float(np.mean([float(m.dropped_fraction) for o in outs for m in o.moe]))
    flat = flat.to(device)
    dist.all_reduce(flat)
    ranks = flat[n + 1].item()
    per_expert = flat[n + 2:-1].view(moe_shape).long().cpu()
    if placement is not None:
        per_expert = torch.stack([placement.to_logical(c, layer) for layer, c in enumerate(per_expert)])
    return StepStats(*(flat[:n] / ranks).tolist(), tokens=int(flat[n].item()),
                     tokens_per_expert=per_expert.tolist(),
                     dropped_fraction=float(flat[-1].item() / ranks))


def forward_backward(model, booster, optimizer, batches: list[dict]) -> list:
    """Loss and gradients of the mean loss over `batches` (gradient accumulation); returns the outputs this rank
    holds (all of them, or with a pipeline the last stage's per-micro-batch outputs).

    With ZeRO-1 the gradients are reduced once per step, after the last micro-batch: the earlier ones run under the
    optimizer's no_sync(), so autograd sums them in p.grad and ZeRO's bucket copies, data-parallel all-reduces and
    grad-store adds (several passes over every gradient) happen once per step instead of once per micro-batch.
    ZeRO-2 reduce-scatters each micro-batch's gradients to free them (its point), so it keeps reducing every
    micro-batch; ColossalAI refuses no_sync there.
    """
    if is_pipeline(booster):
        return _pipeline_forward_backward(model, booster, optimizer, batches)
    defer = len(batches) > 1 and defers_reduction(optimizer)
    outs = []
    for i, batch in enumerate(batches):
        hold = optimizer.no_sync() if defer and i < len(batches) - 1 else nullcontext()
        with hold:
            with torch.profiler.record_function("openmoe.forward"):
                out = model(**batch)
            with torch.profiler.record_function("openmoe.backward"):
                booster.backward(out.loss / len(batches), optimizer)
        outs.append(out)
    return outs


def _pipeline_forward_backward(model, booster, optimizer, batches: list[dict]) -> list:
    """One 1F1B pass over the batches concatenated: its micro-batches replace gradient accumulation (the schedule
    averages the micro-batch losses; the plugin was built for exactly this many, see parallel/sizes.resolve_sizes)."""
    from openmoe.parallel.pipeline import detached

    batch = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    outs = []

    def criterion(out, micro_batch):  # last stage only, once per micro-batch
        outs.append(detached(out))
        return out.loss

    booster.execute_pipeline(iter([batch]), model, criterion, optimizer, return_loss=False)
    return outs


def train_step(model, booster, optimizer, batches_iter, grad_accum: int, device, check_grads: bool = False):
    """One optimizer step; returns (outputs, applied). A step whose loss (or, with check_grads, any local gradient)
    is not finite on some rank is skipped on every rank: gradients dropped, weights and optimizer state unchanged.

    check_grads is for bf16: ZeRO's backward has already reduced the gradients into this rank's partitions; a
    non-finite value anywhere shows up in some rank's partition, and the flag is all-reduced. fp16 leaves gradient
    overflow to its loss scaler, which skips such steps itself. With --lean_zero the same vote is taken inside the
    optimizer step (backend.colossal.step_unless_nonfinite).
    """
    batches = to_device([next(batches_iter) for _ in range(grad_accum)], device)
    outs = forward_backward(model, booster, optimizer, batches)
    if check_grads and folds_finite_check(optimizer):
        # --lean_zero: the step's clipping norm reads every gradient shard anyway; the vote rides on its all-reduce
        with torch.profiler.record_function("openmoe.optimizer_step"):
            losses_finite = bool(torch.isfinite(torch.stack([o.loss.detach() for o in outs])).all())
            applied = step_unless_nonfinite(optimizer, losses_finite)
            optimizer.zero_grad()
        return outs, applied
    grads = local_gradients(model, optimizer)
    with torch.profiler.record_function("openmoe.grad_check"):
        ok = all(torch.isfinite(o.loss).all() for o in outs)
        if check_grads and grads:
            # a NaN/inf anywhere; one multi-tensor norm kernel, the fp32 upcast inside it (no fp32 copy)
            norms = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
            ok = ok and bool(norms.isfinite().all())
        finite = torch.tensor([float(ok)], device=device)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # one flag: ranks without outputs (pipeline) vote 1
        applied = bool(finite.item())
    with torch.profiler.record_function("openmoe.optimizer_step"):
        if applied:
            optimizer.step()
        optimizer.zero_grad()
    return outs, applied


def to_device(batches: list[dict], device) -> list[dict]:
    """The step's CPU batches on the device. An attention mask of all ones (packed or unpadded rows) is dropped
    while still on the CPU (no device sync): without it the model runs plain causal attention (SDPA's flash kernel;
    an explicit mask forces a slower masked kernel), routes every token and counts positions from 0, which is
    exactly what the all-ones mask meant. Dropped for all of the step's batches or none (pipeline micro-batches must
    carry the same keys)."""
    if all("attention_mask" in b and bool(b["attention_mask"].all()) for b in batches):
        batches = [{k: v for k, v in b.items() if k != "attention_mask"} for b in batches]
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def count_expert_load(outs, device, balancer: BiasBalancer | None, placement: ExpertPlacement | None) -> None:
    """One all-reduce of this step's router choices, when --balance_mode bias or --load_balance needs them."""
    if balancer is None and placement is None:
        return
    counts = step_expert_counts(outs, device)
    if balancer is not None:
        balancer.update(counts)
    if placement is not None:
        placement.record(counts)


def step_expert_counts(outs, device) -> torch.Tensor:
    """[moe layers, E] router choices of this step summed over micro-steps and all ranks (one all-reduce)."""
    counts = sum(torch.stack([m.tokens_per_expert.float() for m in o.moe]) for o in outs).to(device)
    dist.all_reduce(counts)
    return counts
