"""The only module that imports colossalai: process-group launch, the MoeHybridParallelPlugin with our shardformer
policy, the booster, the ZeRO fixes (ZeRO-2 restore, gradient-norm fix) and accessors for the ZeRO optimizer's
state. Every private colossalai attribute the project touches is read or written here (and in cpu_compat.py, which
this module applies), so a colossalai upgrade is audited in this package alone.

The parallel layout (which plugin means which sizes) is openmoe/parallel/sizes.py. ColossalAI lays the mesh out as
(moe_dp, pp, ep, tp): ranks of one EP group are adjacent, so on one node the all-to-all stays intra-node.
With pp_size > 1 each optimizer step is one 1F1B pipeline pass over batch_size * grad_accum examples per
data-parallel rank, cut into micro-batches of microbatch_size (the micro-batches replace gradient accumulation).

ZeRO-2 and overlap_communication: colossalai 0.5.0's MoE plugin turns zero_stage 2 into 1 and overlap_communication
off in its constructor (booster/plugin/moe_hybrid_parallel_plugin.py:227-229), because with either one ZeRO reduces
gradients from per-parameter hooks during backward and an expert that got no tokens (hence no gradient) desynchronises
the ranks' buckets (see guard_gradient_hooks). Our MoE layers give every expert weight a gradient every step, so
build_plugin constructs the plugin at stage <= 1 without overlap (nothing to downgrade, no misleading warning) and
then restores the two places the values live: `plugin.zero_stage` and `plugin.zero_config` (partition_grad,
overlap_communication), which configure() hands to the ZeRO optimizer. tests/parallel/test_zero2.py checks that the
optimizer really partitions gradients and that starved experts train as under ZeRO-1.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from openmoe.parallel.sizes import ParallelSizes


def check_gpus_per_node(local_world_size: int, gpus: int) -> None:
    """More processes per node than GPUs would share devices (and NCCL refuses); say so before launching."""
    if gpus and local_world_size > gpus:
        raise ValueError(f"--nproc_per_node {local_world_size} exceeds the {gpus} GPU(s) on this node; accepted: at "
                         f"most {gpus}")


def init_distributed(seed: int, timeout_s: float | None = None) -> tuple[int, int, torch.device]:
    """Join the process group torchrun / `colossalai run` set up (gloo on CPU with our compat patches, NCCL on GPU);
    returns (rank, world size, this rank's device). Idempotent: a second call returns the same. timeout_s: how long
    a collective (and the process-group rendezvous) waits for the other ranks; None: torch's default. It has to be
    torch's module default: colossalai.launch takes no timeout, and every group ColossalAI and we create later
    (dist.new_group with timeout=None: the EP, MoE-DP and pipeline groups) reads that default, not the world's.
    Started without a launcher (`python train.py`, no RANK/WORLD_SIZE), it runs as a one-process world, as HF
    scripts do."""
    import colossalai
    from colossalai.accelerator import get_accelerator

    from openmoe.backend.cpu_compat import apply_cpu_patches

    apply_cpu_patches()  # no-op with CUDA
    if not dist.is_initialized():
        if torch.cuda.is_available():
            check_gpus_per_node(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count())
        if timeout_s is not None:
            import torch.distributed.distributed_c10d as c10d

            c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = datetime.timedelta(seconds=timeout_s)
        if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
            import socket
            import sys

            with socket.socket() as s:  # a port no other job on this host holds
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(port))
            print(f"info: no RANK/WORLD_SIZE in the environment (not started by torchrun or colossalai run): running "
                  f"as a single process (MASTER_ADDR 127.0.0.1, MASTER_PORT {port})", file=sys.stderr, flush=True)
        colossalai.launch_from_torch(seed=seed, verbose=False)
    return dist.get_rank(), dist.get_world_size(), get_accelerator().get_current_device()


@dataclass
class Boosted:
    """What the booster returns, plus the plugin: the wrapped model (`.unwrap()` gives ours), the ZeRO optimizer,
    the scheduler (or None) and the booster whose backward/execute_pipeline the step uses."""

    plugin: object
    booster: object
    model: object
    optimizer: object
    scheduler: object | None


def boost(plugin, model, optimizer, scheduler=None, lean_zero: bool = False, adamw_kernel: bool = False) -> Boosted:
    """Wrap model and optimizer for the plugin and always apply the clipping fix (without it, clipping under expert
    parallelism uses a wrong norm: see fix_grad_clipping); lean_zero: ZeRO's reduction and step on flat buffers
    (see lean_zero1)."""
    from colossalai.booster import Booster

    booster = Booster(plugin=plugin)
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, lr_scheduler=scheduler)
    fix_grad_clipping(optimizer)
    if lean_zero:
        lean_zero1(optimizer, adamw_kernel=adamw_kernel)
    return Boosted(plugin, booster, model, optimizer, scheduler)


def is_pipeline(booster) -> bool:
    return booster.plugin.stage_manager is not None


def dp_rank(plugin) -> int:
    """This rank's index among the dense data-parallel replicas (which slice of the data it reads)."""
    return dist.get_rank(plugin.dp_group)


# ---------------------------------------------------------------- ZeRO optimizer state
def master_params(optimizer) -> list[torch.Tensor]:
    """The fp32 master tensors this rank's optimizer updates (ZeRO: this rank's shard of every parameter)."""
    return [p for group in optimizer.optim.param_groups for p in group["params"]]


def _fp16_mixin(optimizer):
    """fp16's mixed-precision mixin (ZeRO optimizers: mixed_precision_mixin; the pipeline's AMP optimizer without
    ZeRO: mixed_precision), or None (bf16/fp32)."""
    for name in ("mixed_precision_mixin", "mixed_precision"):
        mixin = getattr(optimizer, name, None)
        if mixin is not None and hasattr(mixin, "grad_scaler"):
            return mixin
    return None


def grad_scaler(optimizer):
    """fp16's dynamic loss scaler, or None (bf16)."""
    mixin = _fp16_mixin(optimizer)
    return mixin.grad_scaler if mixin is not None else None


@dataclass
class LossScale:
    """fp16 after optimizer.step(): whether the step found an overflow and skipped the update (colossalai's
    should_skip_step does so silently; its overflow flag, all-reduced over the world, stays set until the next step),
    the scale after the scaler's update, and whether it is at its minimum (backing off can no longer help)."""

    skipped: bool
    scale: float
    at_minimum: bool


def loss_scale_after_step(optimizer) -> LossScale | None:
    """None without fp16. One host read of two scalars (the overflow flag and the scale)."""
    mixin = _fp16_mixin(optimizer)
    if mixin is None:
        return None
    scaler = mixin.grad_scaler
    scale = float(scaler.scale.item())
    low = scaler._min_scale
    return LossScale(bool(mixin.found_overflow.item() > 0), scale, low is not None and scale <= float(low.item()))


def optimizer_state_dict(optimizer) -> dict:
    """This rank's optimizer state as plain tensors: inner optimizer state, fp32 master shards, fp16 loss scaler."""
    scaler = grad_scaler(optimizer)
    return {"optim": optimizer.optim.state_dict(), "masters": [p.detach().cpu() for p in master_params(optimizer)],
            "grad_scaler": scaler.state_dict() if scaler is not None else None}


def load_optimizer_state_dict(optimizer, state: dict) -> None:
    with torch.no_grad():
        for p, m in zip(master_params(optimizer), state["masters"], strict=True):
            p.copy_(m)
    optimizer.optim.load_state_dict(state["optim"])
    if state["grad_scaler"] is not None:
        grad_scaler(optimizer).load_state_dict(state["grad_scaler"])


def local_gradients(model, optimizer) -> list[torch.Tensor]:
    """This rank's gradients after backward: ZeRO keeps the reduced ones in its stores (p.grad is cleared)."""
    if hasattr(optimizer, "get_working_grads_by_group_id"):
        return [g for gid in range(optimizer.num_param_groups) for g in optimizer.get_working_grads_by_group_id(gid)]
    return [p.grad for p in model.parameters() if p.grad is not None]


def defers_reduction(optimizer) -> bool:
    """Whether `optimizer` is a ZeRO-1 optimizer that can hold gradient reduction back (colossalai's no_sync)."""
    return getattr(optimizer, "_partition_grads", True) is False and hasattr(optimizer, "no_sync")


def master_shard_ranges(optimizer, names: dict[int, str]) -> list[tuple[str, int, int, int]]:
    """Per fp32 master shard, in the optimizer's order: (working parameter name, [start, stop) of the working
    parameter's flattened values that the shard holds, padding excluded, the working parameter's numel). ZeRO pads
    each flattened parameter to a multiple of its group size and keeps chunk `local_rank`
    (low_level_optim.py _create_master_param_current_rank)."""
    out = []
    for master in master_params(optimizer):
        p = optimizer.master_to_working_param[id(master)]
        lo = optimizer.pid_to_bucket_store[id(p)].local_rank * master.numel()
        out.append((names[id(p)], lo, min(lo + master.numel(), p.numel()), p.numel()))
    return out


def shard_copies(optimizer) -> Callable[[torch.nn.Parameter], list[tuple[torch.Tensor, int, object]]]:
    """For expert moves (openmoe/parallel/load_balance.py): p -> the flat copies of p's values this rank's ZeRO
    optimizer holds, as (tensor, offset of its first element in p's flat values, group over which the rest is
    spread or None): its fp32 master shard (contiguous chunk `local_rank` of the padded flat parameter) and that
    shard's moments. Empty for a frozen parameter."""

    def copies(p: torch.nn.Parameter) -> list[tuple[torch.Tensor, int, object]]:
        master = optimizer.working_to_master_param.get(id(p))
        if master is None:  # frozen: no optimizer state
            return []
        store = optimizer.pid_to_bucket_store[id(p)]
        assert not isinstance(store.torch_pg, tuple), "ZeRO over a 2-D group is not supported by expert moves"
        lo, group = store.local_rank * master.numel(), store.torch_pg if store.world_size > 1 else None
        state = optimizer.optim.state.get(master, {})  # Adam: exp_avg, exp_avg_sq (and a scalar step)
        moments = [t for t in state.values() if torch.is_tensor(t) and t.shape == master.shape]
        return [(t, lo, group) for t in [master, *moments]]

    return copies


# ---------------------------------------------------------------- plugin
def build_plugin(run, sizes: ParallelSizes):
    """The MoE plugin for `run` (openmoe.train.config.RunConfig) on the validated layout `sizes`."""
    from colossalai.booster.plugin import MoeHybridParallelPlugin

    from openmoe.backend.policy import OpenMoePolicy

    # stage <= 1 and no overlap at construction: the plugin has nothing to downgrade; restore_zero_options sets both
    kwargs = dict(tp_size=1, pp_size=sizes.pp, ep_size=sizes.ep, zero_stage=min(run.parallel.zero_stage, 1),
                  overlap_communication=False, precision=run.parallel.precision,
                  custom_policy=OpenMoePolicy(sizes.num_microbatches, ep_options=dict(
                      comm_overlap=run.parallel.comm_overlap, hierarchical=run.parallel.hierarchical_alltoall)),
                  max_norm=run.optim.grad_clip, enable_flash_attention=False, enable_fused_normalization=False,
                  cpu_offload=run.parallel.offload_optimizer)
    if sizes.pp > 1:
        # the schedule and the policy's last stage must agree on M (see openmoe/parallel/pipeline.py)
        kwargs.update(num_microbatches=sizes.num_microbatches, num_layers_per_stage=list(sizes.layers_per_stage))
    plugin = MoeHybridParallelPlugin(**kwargs)
    restore_zero_options(plugin, run.parallel.zero_stage, run.parallel.overlap_communication)
    return plugin


def restore_zero_options(plugin, zero_stage: int, overlap_communication: bool) -> None:
    """Give a MoeHybridParallelPlugin the ZeRO stage and overlap its constructor refuses (see the module docstring).

    Its constructor stores the downgraded values in `zero_stage` (read by configure to choose the ZeRO optimizer, and
    by get_checkpoint_io and no_sync) and in `zero_config` (partition_grad is stage 2; both passed to
    MoeHybridParallelZeroOptimizer by configure); nothing else keeps them. When ZeRO will reduce from gradient hooks,
    configure also installs guard_gradient_hooks on the optimizer it builds.
    """
    plugin.zero_stage = zero_stage
    plugin.zero_config.update(partition_grad=zero_stage == 2, overlap_communication=overlap_communication)
    if zero_stage >= 1 and (zero_stage == 2 or overlap_communication):
        configure = plugin.configure

        def configure_guarded(*args, **kwargs):
            model, optimizer, *rest = configure(*args, **kwargs)
            if optimizer is not None:
                guard_gradient_hooks(optimizer)
            return (model, optimizer, *rest)

        plugin.configure = configure_guarded


def guard_gradient_hooks(optimizer) -> None:
    """Raise, on the rank concerned and before any gradient is reduced, when a trainable parameter is about to get no
    gradient in a backward where ZeRO reduces from gradient hooks, instead of hanging.

    With partition_grad (ZeRO-2) or overlap_communication, colossalai 0.5.0's ZeRO (zero/low_level/low_level_optim.py)
    hooks every parameter's gradient accumulation (_attach_reduction_hook, :305-321) and adds the gradient to a bucket;
    all buckets are reduced whenever one fills or the gradient's param group differs from the bucket's (:431-442).
    A parameter without a gradient never fires its hook, so the ranks cut their buckets at different points and issue
    reduce-scatters / all-reduces of different sizes: NCCL hangs (gloo reports a size mismatch), or, if sizes happen
    to agree, sums the wrong elements. ZeRO-1 without overlap has no hooks: after backward _sync_grad (:722-734) adds
    every gradient in parameter order and gives expert parameters without one a zero gradient; that is why the MoE
    plugin downgrades to it (upstream's Mixtral block runs only the experts that received tokens).

    Our layers put every local expert weight in the graph every step (stacked [E_l, ...] tensors, run on a capacity
    or dropless buffer that may hold no token at all; the grouped path on zero rows), so this never fires; it keeps
    that property from breaking silently. Before each backward it walks the autograd graph from the loss (about 2 ms
    for 12 layers on CPU) for the AccumulateGrad nodes of the parameters ZeRO manages. Filling a missing gradient
    with zeros instead cannot be made safe from here: the zero would reach its hook at a different point of the
    backward than the real gradient does on the ranks that used the parameter, so the buckets would still differ.
    """
    params = [p for group in optimizer._working_param_groups.values() for p in group]
    model = getattr(optimizer, "model", None)  # ColossalAI's ZeRO optimizers keep the boosted model
    names = {id(p): n for n, p in model.unwrap().named_parameters()} if model is not None else {}
    backward = optimizer.backward

    def guarded_backward(loss, *args, **kwargs):
        if optimizer.require_grad_sync:
            reached = graph_leaves(loss)
            missing = [names.get(id(p), f"<{tuple(p.shape)}>") for p in params if id(p) not in reached]
            if missing:
                raise RuntimeError(f"{len(missing)} trainable parameter(s) are not in this backward's graph and would "
                                   f"get no gradient: {missing[:8]}; with zero_stage 2 or overlap_communication "
                                   f"ColossalAI's ZeRO would hang. Every parameter must be used every step (run "
                                   f"unrouted experts on an empty buffer), or use --zero_stage 1")
        return backward(loss, *args, **kwargs)

    optimizer.backward = guarded_backward


def graph_leaves(loss) -> set[int]:
    """ids of the leaf tensors whose AccumulateGrad nodes the backward of `loss` reaches."""
    seen, stack, leaves = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)  # AccumulateGrad
        if leaf is not None:
            leaves.add(id(leaf))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def fix_grad_clipping(optimizer) -> None:
    """Make ColossalAI's ZeRO gradient clipping use the true global gradient norm under expert parallelism, computed
    once, and apply the clipping (and fp16 unscaling) factor without an extra pass over the gradients.

    colossalai 0.5.0 (zero/low_level/low_level_optim.py step) adds the norms of its gradient stores linearly instead of
    in quadrature, and reduces the expert store's norm over the MoE data-parallel group only, so each EP rank sees a
    different, too large norm (measured 1.49 / 1.42 for a true 1.19) and clips by a different factor. Every rank's
    ZeRO partitions (dense over dp, experts over moe_dp, distinct experts across ep, distinct layers across pp: the
    stages share no parameter, lm_head being untied) are disjoint pieces of the full gradient, so one scalar
    all-reduce over the world of their squared norms gives the exact global norm. tests/parallel/test_plugins.py
    checks it against a single process for ep, ep_zero and pp x ep.

    Speed (the 1-GPU 8B profile in benchmark/RESULTS.md): colossalai's own norm (_compute_grad_norm, :637-690) copies
    every gradient to fp64 and reads each norm back to the host; its result is discarded here, so it is replaced by
    a constant. Its _unscale_and_clip_grads (:702-716) multiplies every fp32 gradient by 1 / divisor even when the
    divisor is 1; here the divisor goes to the fused AdamW kernel as its grad_scale input (the way torch's GradScaler
    unscales for fused optimizers), see divide_gradients.
    """
    if not hasattr(optimizer, "_unscale_and_clip_grads"):
        return

    def unscale_and_clip(grad_groups_flat, total_norm):
        divide_gradients(optimizer.optim, grad_groups_flat, clip_divisor(optimizer, grad_groups_flat))

    optimizer._compute_grad_norm = lambda *args, **kwargs: 0.0
    optimizer._unscale_and_clip_grads = unscale_and_clip


def clip_divisor(optimizer, grads: list[torch.Tensor], finite: bool = True) -> float:
    """What the step divides this rank's gradient shards `grads` by (fp16 loss scale times the clipping factor), from
    the exact global norm: one scalar all-reduce of the squared norms (see fix_grad_clipping). Sets the optimizer's
    _current_grad_norm (what get_grad_norm returns), non-finite on every rank when any rank's gradient is or when
    some rank passes finite=False (its vote, e.g. on its losses). The gradients may be in host memory
    (--offload_optimizer: colossalai's step copies them there before this); the all-reduce runs on the device."""
    from colossalai.accelerator import get_accelerator

    sq = torch.zeros((), dtype=torch.float64, device=get_accelerator().get_current_device())
    if grads:
        # one multi-tensor kernel; the fp32 upcast happens inside it: no full-size copy of the gradient
        norms = torch._foreach_norm([g.detach() for g in grads], 2, dtype=torch.float32)
        sq += torch.stack(norms).double().square().sum().to(sq.device)
    if not finite:
        sq.fill_(float("inf"))
    dist.all_reduce(sq)
    norm = float(sq.sqrt())  # still multiplied by the fp16 loss scale
    # colossalai's _unscale_and_clip_grads arithmetic, on the true norm
    div_scale = 1.0
    if optimizer.mixed_precision_mixin is not None:
        div_scale = float(optimizer.mixed_precision_mixin.get_grad_div_scale())  # fp16: the loss scale
    optimizer._current_grad_norm = norm / div_scale
    if optimizer._clip_grad_norm > 0.0:
        clip = (norm / div_scale + 1e-6) / optimizer._clip_grad_norm
        if clip > 1:
            div_scale = clip * div_scale
    return div_scale


def divide_gradients(inner, grads, div_scale: float) -> None:
    """Have the next inner.step() use grads / div_scale. A fused Adam/AdamW divides inside its kernel (its grad_scale
    input, set here for this step or cleared); any other optimizer gets the gradients divided in place, and nothing
    happens when div_scale is 1."""
    import torch

    fused = isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) and all(
        g.get("fused") for g in inner.param_groups)
    if fused:
        inner.grad_scale = None if div_scale == 1.0 or not grads else torch.full(
            (), div_scale, dtype=torch.float32, device=grads[0].device)
    elif div_scale != 1.0:
        for g in grads:
            g.mul_(1.0 / div_scale)


# ---------------------------------------------------------------- lean ZeRO-1 reduction and step
LEAN_BUCKET_ELEMS = 256 * 1024 * 1024  # gradient / parameter elements per reduce-scatter or all-gather
LEAN_STEP_BUCKET_ELEMS = 256 * 1024 * 1024  # master elements per inner optimizer step (1 GiB of fp32 gradients)


def lean_zero1(optimizer, bucket_elems: int = LEAN_BUCKET_ELEMS, step_bucket_elems: int = LEAN_STEP_BUCKET_ELEMS,
               adamw_kernel: bool = False) -> None:
    """Replace colossalai's ZeRO-1 gradient reduction (after the step's last backward) and its optimizer step with
    versions that move fewer bytes and launch fewer kernels; the arithmetic, the master-shard layout (chunk
    `local_rank` of each padded flat parameter), the gradient stores and what get_param_grad / local_gradients /
    get_grad_norm return stay as colossalai's. Measured on 2 x H200: benchmark/RESULTS.md, "Issue 19, session 6".

    Reduction (_sync_grad), per process group of the gradient stores:
    - colossalai 0.5.0 (low_level_optim.py _run_reduction) copies each bucket of gradients into a flat buffer,
      divides it, ALL-reduces it (every rank receives every rank's chunks, of which ZeRO-1 uses one) and keeps views;
      it does this also over the expert parameters' MoE data-parallel group when that group has one rank (plugin
      `ep`: copy, divide by 1, a one-rank all-reduce).
    - here: one-rank groups keep p.grad itself as the shard (no copy, no collective); larger groups copy each
      bucket rank-major into one send buffer and REDUCE-SCATTER it (half the bytes of the all-reduce), then divide
      the received shard (for a power-of-two group the same values: scaling by 2^-k is exact).
    Step (step):
    - colossalai casts every gradient shard to fp32 one parameter at a time, runs the inner optimizer, casts every
      fp32 master to a new bf16 tensor, copies those into buckets, all-gathers each bucket (also over one-rank groups)
      and copies the result back.
    - here: the clipping norm reads the bf16 shards (same values, half the bytes; one multi-tensor norm kernel); per
      bucket of masters one foreach copy casts the shards into one fp32 buffer and the inner step updates those
      masters (torch optimizers skip parameters without .grad), so only one bucket of fp32 gradients exists at a
      time (colossalai: all of them, 22 GiB for OpenMoE-8B at EP 2); after the inner steps larger groups cast the
      masters into one send buffer per bucket and all-gather it asynchronously, one-rank groups cast the masters
      straight into the working parameters (one foreach copy) meanwhile, then one foreach copy per bucket puts the
      gathered values into the working parameters.
    - adamw_kernel (run option --adamw_kernel; torch.optim.AdamW only): instead of the fp32 buffers and torch's fused
      AdamW, openmoe/optim_kernels.py updates each master from its bf16 shard in one pass, and writes one-rank
      groups' working weights in the same pass (no separate cast).
    - ZeRO's cpu_offload (run option --offload_optimizer: the masters and the optimizer state in host memory):
      colossalai casts each gradient shard to fp32 on the GPU, copies it to pageable host memory, steps, and copies
      each fp32 master back (4 bytes per element each way, one synchronous copy per parameter). Here, per bucket,
      the bf16 shards cross in one copy into pinned memory and are cast on the host, and after the inner step the
      masters are cast to bf16 on the host and cross back in one copy (2 bytes per element each way); those device
      copies then go to the working parameters as above. Same values: the casts round to nearest-even on either
      side. Not with adamw_kernel (a device kernel).
    Refused (ValueError): master_weights=False, overlap_allgather, fp8 communication, a
    communication dtype, a 2-D data-parallel group, an inner colossalai DistributedOptim (its step reads state
    across parameters; here the inner step runs once per bucket), ZeRO-2 and overlap_communication (they reduce from
    gradient hooks during backward; not covered here). A pipeline (reduced by colossalai's sync_dp_grads) is refused
    by the run config (openmoe/parallel/sizes.py)."""
    from colossalai.interface.optimizer import DistributedOptim

    bad = [name for name, on in (("partition_grad (ZeRO-2)", optimizer._partition_grads),
                                 ("overlap_communication", optimizer._overlap_communication),
                                 ("master_weights=False", not optimizer._master_weights),
                                 ("overlap_allgather", optimizer._overlap_allgather),
                                 ("fp8_communication", optimizer._fp8_communication),
                                 ("communication_dtype", optimizer._communication_dtype is not None),
                                 ("a 2-D data-parallel group", any(isinstance(pg, tuple)
                                                                   for pg in optimizer.pg_to_param_list))) if on]
    if isinstance(optimizer.optim, DistributedOptim):
        bad.append(f"inner optimizer {type(optimizer.optim).__name__} (a DistributedOptim)")
    if bad:
        raise ValueError(f"lean_zero: not supported with ZeRO's {', '.join(bad)}; accepted: ZeRO-1 reduced after "
                         f"backward, fp32 master weights, one data-parallel group per store, bf16/fp16 "
                         f"communication, a per-parameter inner optimizer (torch.optim's)")
    if adamw_kernel and optimizer._cpu_offload:
        raise ValueError("adamw_kernel runs on the device; with ZeRO's cpu_offload (--offload_optimizer) the step runs "
                         "torch's fused AdamW on the host: drop --adamw_kernel")
    if adamw_kernel:
        from openmoe.optim_kernels import check_adamw

        check_adamw(optimizer.optim)
    optimizer._sync_grad = lambda: _lean_reduce(optimizer, bucket_elems)
    optimizer.step = lambda closure=None: _lean_step(optimizer, bucket_elems, step_bucket_elems, closure,
                                                     adamw_kernel=adamw_kernel)
    optimizer._openmoe_lean_step = lambda finite: _lean_step(optimizer, bucket_elems, step_bucket_elems, None, finite,
                                                             adamw_kernel)


def folds_finite_check(optimizer) -> bool:
    """Whether `optimizer` runs the lean step, which can take the step's finiteness vote itself
    (step_unless_nonfinite)."""
    return hasattr(optimizer, "_openmoe_lean_step")


def step_unless_nonfinite(optimizer, losses_finite: bool) -> bool:
    """The lean optimizer step, skipped on every rank when some rank's losses are not finite (losses_finite is this
    rank's vote) or some gradient shard is not: the vote rides on the clipping norm's all-reduce, so the gradients
    are read once (no separate finiteness pass, no second all-reduce and host sync). Returns whether it stepped."""
    return optimizer._openmoe_lean_step(losses_finite)


def _buckets(items: list, size, limit: int) -> list[list]:
    """items cut in order into runs whose sizes sum to at most limit (an item larger than limit alone)."""
    out, cur, n = [], [], 0
    for it in items:
        if cur and n + size(it) > limit:
            out.append(cur)
            cur, n = [], 0
        cur.append(it)
        n += size(it)
    return out + [cur] if cur else out


def _keep_grad_shard(optimizer, group_id: int, p, shard: torch.Tensor) -> None:
    """Put this rank's reduced shard of p's gradient into colossalai's gradient store where its step, get_param_grad
    and get_working_grads_by_group_id read it (ZeRO-1: list index local_rank; the other ranks' slots stay None: this
    rank never received them). A second reduction before the step adds to it, as colossalai's _add_grad does."""
    store = optimizer.pid_to_grad_store[id(p)]
    held = store.get_partitioned_gradients_by_param_id(group_id, id(p))
    if held:
        held[store.local_rank].add_(shard)
        return
    slots = [None] * store.world_size
    slots[store.local_rank] = shard
    store._grads_of_params.setdefault(group_id, {})[id(p)] = slots
    store.grad_to_param_mapping[id(shard)] = id(p)


def _lean_reduce(optimizer, bucket_elems: int) -> None:
    """ZeRO-1's gradient reduction after the step's last backward (replaces _sync_grad; see lean_zero1)."""
    from colossalai.tensor.moe_tensor.api import is_moe_tensor

    for group_id in range(optimizer.num_param_groups):
        per_store: dict[int, tuple[object, list]] = {}
        for p in optimizer._working_param_groups[group_id]:
            if is_moe_tensor(p) and p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)  # as colossalai: an unrouted expert reduces zeros, the ranks agree
            if p.requires_grad and p.grad is not None:
                store = optimizer.pid_to_bucket_store[id(p)]
                per_store.setdefault(id(store), (store, []))[1].append(p)
        for store, params in per_store.values():
            if store.world_size == 1:  # nothing to reduce: the gradient is the shard (padding is 0 for one rank)
                for p in params:
                    _keep_grad_shard(optimizer, group_id, p, p.grad.detach().view(-1))
                    p.grad = None
                continue
            world = store.world_size
            shard = lambda p: (p.numel() + optimizer.get_param_padding_size(p)) // world
            for bucket in _buckets(params, lambda p: world * shard(p), bucket_elems):
                _reduce_scatter_bucket(optimizer, group_id, store, bucket, [shard(p) for p in bucket])


def _reduce_scatter_bucket(optimizer, group_id: int, store, params: list, shards: list[int]) -> None:
    """send [world, K]: row r holds chunk r of every parameter's padded flat gradient (K = sum of the chunk sizes);
    the reduce-scatter leaves row local_rank summed over the group in recv [K]."""
    world, total = store.world_size, sum(shards)
    grads = [p.grad.detach().view(-1) for p in params]
    send = torch.empty(world * total, dtype=grads[0].dtype, device=grads[0].device)
    dst, src, off = [], [], 0
    for g, c in zip(grads, shards):
        for r in range(world):
            lo, hi = r * c, min((r + 1) * c, g.numel())
            row = send[r * total + off: r * total + off + c]
            if hi > lo:
                dst.append(row[:hi - lo])
                src.append(g[lo:hi])
            if hi - lo < c:  # ZeRO's padding of the last chunk
                row[max(hi - lo, 0):].zero_()
        off += c
    torch._foreach_copy_(dst, src)
    del dst, src, grads
    for p in params:
        p.grad = None  # the send buffer holds the values now
    recv = torch.empty(total, dtype=send.dtype, device=send.device)
    dist.reduce_scatter_tensor(recv, send, group=store.torch_pg)
    del send
    recv.div_(world)
    for p, piece in zip(params, recv.split(shards)):
        _keep_grad_shard(optimizer, group_id, p, piece)


def _lean_step(optimizer, bucket_elems: int, step_bucket_elems: int, closure=None, finite: bool = True,
               adamw_kernel: bool = False) -> bool:
    """colossalai's LowLevelZeroOptimizer.step on flat buffers (see lean_zero1). finite: this rank's vote that its
    losses are finite; the step is skipped on every rank (weights and optimizer state unchanged) when some rank votes
    no or some gradient shard is not finite: the clipping norm's all-reduce carries both. Returns whether it stepped."""
    assert closure is None, "closure is not supported by step()"
    if not optimizer.require_grad_sync:
        return False
    mixin = optimizer.mixed_precision_mixin
    if mixin is not None and mixin.should_skip_step():  # fp16 overflow: colossalai's own skip
        optimizer.zero_grad()
        return False
    working, masters, shards = [], [], []
    for group_id in range(optimizer.num_param_groups):
        real = []
        for w, m in zip(optimizer._working_param_groups[group_id],
                        optimizer._master_param_groups_of_current_rank[group_id]):
            store = optimizer.pid_to_grad_store[id(w)]
            held = store.get_partitioned_gradients_by_param_id(group_id, id(w))
            if held:  # a parameter without a gradient (e.g. a dropped layer) is not updated
                working.append(w)
                masters.append(m)
                shards.append(held[0 if optimizer._partition_grads else store.local_rank])
                real.append(m)
        optimizer.optim.param_groups[group_id]["params"] = real
    div_scale = clip_divisor(optimizer, shards, finite)  # every rank joins its all-reduce
    stepped = math.isfinite(optimizer._current_grad_norm)
    written = set()  # ids of masters whose working weights the AdamW kernel already wrote
    if masters and stepped and adamw_kernel:
        from openmoe.optim_kernels import fused_adamw_

        outs = {id(m): w.data.view(-1) for w, m in zip(working, masters)
                if dist.get_world_size(optimizer.param_to_pg[w]) == 1 and w.numel() == m.numel()}
        fused_adamw_(optimizer.optim, masters, shards, div_scale, outs)
        optimizer.optim._opt_called = True  # what torch's step wrapper records (the LR scheduler checks it)
        written = set(outs)
    elif masters and stepped:
        masters = _inner_step(optimizer, masters, shards, div_scale, step_bucket_elems)
    for group_id in range(optimizer.num_param_groups):
        optimizer.optim.param_groups[group_id]["params"] = optimizer._master_param_groups_of_current_rank[group_id]
    if stepped:
        with torch.no_grad():
            _lean_gather(optimizer, working, masters, bucket_elems, written)
    return stepped


def _inner_step(optimizer, masters: list, shards: list, div_scale: float, step_bucket_elems: int) -> list:
    """The inner optimizer's step over fp32 copies of the shards, one bucket at a time (one foreach copy each, the
    cast inside it): the optimizer skips parameters without .grad, so each master is updated exactly once, and at
    most one bucket of fp32 gradients exists instead of all of them (colossalai: 4 bytes per parameter of this
    rank's shard, 22 GiB for OpenMoE-8B at EP 2). Returns what the working parameters are written from: the masters,
    or with cpu_offload their bf16 copies on the device."""
    offload, updated = optimizer._cpu_offload, []
    for bucket in _buckets(list(zip(masters, shards)), lambda ms: ms[0].numel(), step_bucket_elems):
        sizes = [m.numel() for m, _ in bucket]
        flat = torch.empty(sum(sizes), dtype=masters[0].dtype, device=masters[0].device)
        fp32 = [v.view_as(m) for v, (m, _) in zip(flat.split(sizes), bucket)]
        if offload:
            _shards_to_host(optimizer, [g for _, g in bucket], flat)
        else:
            torch._foreach_copy_(fp32, [g.view_as(m) for m, g in bucket])
        for (m, _), g in zip(bucket, fp32):
            m.grad = g
        divide_gradients(optimizer.optim, fp32, div_scale)
        optimizer.optim.step()
        for m, _ in bucket:
            m.grad = None
        del flat, fp32
        if offload:
            updated += _masters_to_device(optimizer, [m for m, _ in bucket], shards[0].device)
    return updated if offload else masters


def _pinned(optimizer, key: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host buffer of at least numel elements for copies to and from `device`, kept on the optimizer between steps
    (page-locked where the device is a GPU: one DMA copy at full PCIe speed, and the allocation is slow to repeat)."""
    cache = optimizer.__dict__.setdefault("_openmoe_host_buffers", {})
    buf = cache.get(key)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = cache[key] = torch.empty(numel, dtype=dtype, pin_memory=device.type == "cuda")
    return buf[:numel]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # the host reads (or reuses) what the copy moved


def _shards_to_host(optimizer, shards: list[torch.Tensor], out: torch.Tensor) -> None:
    """offload: bf16 gradient shards (device) -> `out`, the fp32 flat buffer of their masters (host): one foreach
    copy into a device buffer, one copy into pinned memory, the cast on the host."""
    device, sizes = shards[0].device, [g.numel() for g in shards]
    staged = torch.empty(out.numel(), dtype=shards[0].dtype, device=device)
    torch._foreach_copy_(list(staged.split(sizes)), [g.view(-1) for g in shards])
    host = _pinned(optimizer, "grads", out.numel(), staged.dtype, device)
    host.copy_(staged, non_blocking=True)
    _sync(device)
    out.copy_(host)


def _masters_to_device(optimizer, masters: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """offload: fp32 masters (host) -> bf16 copies on `device`, one per master (the cast on the host into pinned
    memory, one copy over). The pinned buffer is reused by the next bucket, so the copy is waited for. Every bucket's
    copies live until _lean_gather writes the working parameters: 2 bytes per element of this rank's shard on the
    device (11.8 GB for the full OpenMoE-8B at EP 2), at the step, when no activations are held."""
    sizes = [m.numel() for m in masters]
    host = _pinned(optimizer, "masters", sum(sizes), optimizer._dtype, device)
    torch._foreach_copy_(list(host.split(sizes)), [m.view(-1) for m in masters])  # fp32 -> bf16, nearest-even
    out = torch.empty(sum(sizes), dtype=optimizer._dtype, device=device)
    out.copy_(host, non_blocking=True)
    _sync(device)
    return [v.view_as(m) for v, m in zip(out.split(sizes), masters)]


def _lean_gather(optimizer, working: list, masters: list, bucket_elems: int, written: set = frozenset()) -> None:
    """Every rank's updated masters into the working (bf16/fp16) parameters: larger groups by an all-gather per
    bucket into [world, K] and one foreach copy back into the parameters (row r, chunk of parameter i ->
    flat_i[r * c_i: (r + 1) * c_i], ZeRO's padding dropped), one-rank groups by a direct cast while those all-gathers
    run. Written into each parameter's current .data (what colossalai's bucketed write-back does too), not a view
    cached at construction. masters: the fp32 masters, or with cpu_offload their bf16 copies on the device.
    written: ids of masters already in their working parameters (the AdamW kernel's)."""
    per_pg: dict[int, tuple[object, list]] = {}
    for w, m in zip(working, masters):
        if id(m) in written:
            continue
        pg = optimizer.param_to_pg[w]
        per_pg.setdefault(id(pg), (pg, []))[1].append((w.data.view(-1), m))
    local, pending = [], []
    for pg, pairs in per_pg.values():
        world = dist.get_world_size(pg)
        if world == 1:  # the master is the whole parameter
            local += pairs
            continue
        for bucket in _buckets(pairs, lambda fm: world * fm[1].numel(), bucket_elems):
            shards = [m.numel() for _, m in bucket]
            total = sum(shards)
            send = torch.empty(total, dtype=optimizer._dtype, device=bucket[0][1].device)
            torch._foreach_copy_(list(send.split(shards)), [m for _, m in bucket])  # fp32 -> bf16 (round to nearest)
            out = torch.empty(world * total, dtype=send.dtype, device=send.device)
            pending.append((dist.all_gather_into_tensor(out, send, group=pg, async_op=True), out, bucket, shards,
                            world, send))
    if local:  # on the compute stream, beside the all-gathers on NCCL's
        torch._foreach_copy_([flat for flat, _ in local], [m for _, m in local])
    for work, out, bucket, shards, world, _ in pending:
        work.wait()
        total, dst, src = sum(shards), [], []
        for r in range(world):
            off = r * total
            for (flat, _), c in zip(bucket, shards):
                lo, hi = r * c, min((r + 1) * c, flat.numel())
                if hi > lo:
                    dst.append(flat[lo:hi])
                    src.append(out[off: off + hi - lo])
                off += c
        torch._foreach_copy_(dst, src)
