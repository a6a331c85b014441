"""The only place MoeHybridParallelPlugin is built. Plugins as a small table:

  plugin   | ep_size                   | MoE data parallel (replicas of each expert) | pipeline
  ---------+---------------------------+---------------------------------------------+----------
  ep       | world                     | 1                                           | no
  ep_zero  | world / extra_dp_size     | extra_dp_size (ZeRO shards across them)     | no
  hybrid   | --ep_size                 | world / (pp_size * ep_size)                 | pp_size

Dense parameters are data-parallel over world / pp_size ranks in all three. ColossalAI lays the mesh out as
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

from dataclasses import dataclass, replace

from openmoe.config import OpenMoeConfig
from openmoe.run_config import TrainConfig


@dataclass(frozen=True)
class ParallelSizes:
    world: int
    ep: int
    pp: int
    moe_dp: int  # replicas of each expert
    dp: int  # replicas of each dense parameter (= world / pp)
    num_microbatches: int = 1  # pipeline micro-batches per step (1 without pipeline)
    layers_per_stage: tuple[int, ...] = ()  # decoder layers held by each pipeline stage (empty without pipeline)


def resolve_sizes(run: TrainConfig, model: OpenMoeConfig, world: int) -> ParallelSizes:
    """Validate every size up front; each error names the numbers involved and what would be accepted."""
    if run.tp_size != 1 or run.sp_size != 1:
        raise ValueError(f"tensor/sequence parallelism is not supported for OpenMoE (tp_size={run.tp_size}, "
                         f"sp_size={run.sp_size}); accepted: 1. Use ep/ep_zero/hybrid to scale")
    if run.plugin != "hybrid" and run.pp_size != 1:
        raise ValueError(f"pp_size ({run.pp_size}) > 1 needs --plugin hybrid (got '{run.plugin}')")
    if run.plugin != "ep_zero" and run.extra_dp_size != 1:
        raise ValueError(f"extra_dp_size ({run.extra_dp_size}) is for --plugin ep_zero only (got '{run.plugin}')")
    if run.plugin == "ep":
        ep, pp = world, 1
    elif run.plugin == "ep_zero":
        if run.extra_dp_size < 1 or world % run.extra_dp_size:
            raise ValueError(f"world size ({world}) must be divisible by extra_dp_size ({run.extra_dp_size})")
        ep, pp = world // run.extra_dp_size, 1
    else:
        if run.ep_size is None:
            raise ValueError("--plugin hybrid needs --ep_size")
        ep, pp = run.ep_size, run.pp_size
        if pp < 1 or world % (pp * ep):
            raise ValueError(f"world size ({world}) must be divisible by pp_size ({pp}) * ep_size ({ep})")
        if pp > model.num_hidden_layers:
            raise ValueError(f"pp_size ({pp}) exceeds the number of layers ({model.num_hidden_layers})")
        if pp > 1 and run.zero_stage > 1:
            raise ValueError(f"zero_stage ({run.zero_stage}) must be <= 1 with pipeline parallelism")
    if run.ep_size is not None and run.ep_size != ep:
        raise ValueError(f"--ep_size {run.ep_size} contradicts --plugin {run.plugin} on {world} ranks, "
                         f"which implies ep_size {ep}")
    if model.num_experts % ep:
        raise ValueError(f"num_experts ({model.num_experts}) must be divisible by ep_size ({ep})")
    if ep > 1 and run.zero_stage < 1:
        raise ValueError(f"expert parallelism (ep_size {ep}) needs zero_stage >= 1 in ColossalAI's MoE plugin "
                         f"(got {run.zero_stage})")
    if run.zero_stage >= 1 and run.precision == "fp32":
        raise ValueError(f"zero_stage {run.zero_stage} needs --precision bf16 or fp16 (ColossalAI's ZeRO keeps "
                         f"fp32 master weights itself); got fp32")
    if run.zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage ({run.zero_stage}) must be 0, 1 or 2")
    if run.overlap_communication and (run.zero_stage < 1 or pp > 1):
        raise ValueError(f"--overlap_communication overlaps ZeRO's gradient reduction with backward: it needs "
                         f"zero_stage >= 1 (got {run.zero_stage}) and no pipeline (pp_size {pp}; with a pipeline "
                         f"ColossalAI reduces once after the schedule, so there is nothing to overlap)")
    if run.comm_overlap < 0:
        raise ValueError(f"--comm_overlap ({run.comm_overlap}) must be >= 0 (number of chunks; 0 is off)")
    if run.comm_overlap and (run.dropless or run.hierarchical_alltoall):
        raise ValueError("--comm_overlap works with capacity routing and the flat all-to-all: drop --dropless and "
                         "--hierarchical_alltoall, or --comm_overlap")
    if run.balance_mode == "bias" and pp > 1:
        raise ValueError("--balance_mode bias is not supported with pipeline parallelism yet (pp_size "
                         f"{pp}); use --plugin ep or ep_zero")
    if run.hierarchical_alltoall and run.dropless:
        raise ValueError("--hierarchical_alltoall needs equal splits (capacity routing): drop --dropless")
    if run.use_layernorm_kernel:
        from openmoe.kernels import fused_rmsnorm_kernel

        fused_rmsnorm_kernel()  # raises the one-line error when apex is missing
    sizes = ParallelSizes(world=world, ep=ep, pp=pp, moe_dp=world // (pp * ep), dp=world // pp)
    return _pipeline_sizes(run, model, sizes) if pp > 1 else sizes


def _pipeline_sizes(run: TrainConfig, model: OpenMoeConfig, sizes: ParallelSizes) -> ParallelSizes:
    from openmoe.parallel.pipeline import stage_ranges

    if run.microbatch_size < 1 or run.batch_size % run.microbatch_size:
        raise ValueError(f"batch_size ({run.batch_size}) must be divisible by microbatch_size "
                         f"({run.microbatch_size})")
    num_microbatches = run.batch_size * run.grad_accum // run.microbatch_size
    if num_microbatches < sizes.pp:
        raise ValueError(f"batch_size ({run.batch_size}) * grad_accum ({run.grad_accum}) / microbatch_size "
                         f"({run.microbatch_size}) = {num_microbatches} micro-batches per step, fewer than the "
                         f"{sizes.pp} pipeline stages; the 1F1B schedule needs at least one per stage")
    ranges = stage_ranges(model.num_hidden_layers, sizes.pp)
    for i, layers in enumerate(ranges):
        # ColossalAI's MoE ZeRO optimizer refuses a rank without expert parameters
        if not any(model.is_moe_layer(j) for j in layers):
            raise ValueError(f"pipeline stage {i} of {sizes.pp} would hold layers {layers.start}..{layers.stop - 1}, "
                             f"none of them MoE (every {model.moe_layer_interval}th layer is); each stage needs "
                             f"at least one: use a smaller pp_size")
    return replace(sizes, num_microbatches=num_microbatches, layers_per_stage=tuple(len(r) for r in ranges))


def build_plugin(run: TrainConfig, sizes: ParallelSizes):
    from colossalai.booster.plugin import MoeHybridParallelPlugin

    from openmoe.parallel.policy import OpenMoePolicy

    # stage <= 1 and no overlap at construction: the plugin has nothing to downgrade; restore_zero_options sets both
    kwargs = dict(tp_size=1, pp_size=sizes.pp, ep_size=sizes.ep, zero_stage=min(run.zero_stage, 1),
                  overlap_communication=False, precision=run.precision,
                  custom_policy=OpenMoePolicy(sizes.num_microbatches, ep_options=dict(
                      comm_overlap=run.comm_overlap, hierarchical=run.hierarchical_alltoall)),
                  max_norm=run.grad_clip, enable_flash_attention=False, enable_fused_normalization=False)
    if sizes.pp > 1:
        # the schedule and the policy's last stage must agree on M (see openmoe/parallel/pipeline.py)
        kwargs.update(num_microbatches=sizes.num_microbatches, num_layers_per_stage=list(sizes.layers_per_stage))
    plugin = MoeHybridParallelPlugin(**kwargs)
    restore_zero_options(plugin, run.zero_stage, run.overlap_communication)
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
    import torch
    import torch.distributed as dist

    if not hasattr(optimizer, "_unscale_and_clip_grads"):
        return

    def unscale_and_clip(grad_groups_flat, total_norm):
        sq = torch.zeros((), dtype=torch.float64, device=grad_groups_flat[0].device if grad_groups_flat else "cpu")
        for g in grad_groups_flat:
            # the fp32 upcast happens inside the reduction kernel: no full-size copy of the gradient
            sq += torch.linalg.vector_norm(g.detach(), dtype=torch.float32).double().square()
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
        divide_gradients(optimizer.optim, grad_groups_flat, div_scale)

    optimizer._compute_grad_norm = lambda *args, **kwargs: 0.0
    optimizer._unscale_and_clip_grads = unscale_and_clip


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
