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
    if run.zero_stage == 2:
        raise ValueError("zero_stage 2 with expert parallelism hangs in ColossalAI 0.5.0 when an expert receives no "
                         "tokens (its MoE plugin silently falls back to 1); use --zero_stage 1")
    if run.load_balance:
        raise NotImplementedError("--load_balance is not yet implemented (tracked in the balancing/overlap issue); "
                                  "--balance_mode bias balances without moving experts")
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
        try:
            import apex.normalization  # noqa: F401
        except ImportError:
            raise ValueError("--use_layernorm_kernel needs NVIDIA apex, which is not installed") from None
        raise NotImplementedError("--use_layernorm_kernel: apex fused RMSNorm is not wired yet")
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

    kwargs = dict(tp_size=1, pp_size=sizes.pp, ep_size=sizes.ep, zero_stage=run.zero_stage,
                  precision=run.precision, custom_policy=OpenMoePolicy(sizes.num_microbatches, ep_options=dict(
                      comm_overlap=run.comm_overlap, hierarchical=run.hierarchical_alltoall)),
                  max_norm=run.grad_clip, enable_flash_attention=False, enable_fused_normalization=False)
    if sizes.pp > 1:
        # the schedule and the policy's last stage must agree on M (see openmoe/parallel/pipeline.py)
        kwargs.update(num_microbatches=sizes.num_microbatches, num_layers_per_stage=list(sizes.layers_per_stage))
    return MoeHybridParallelPlugin(**kwargs)


def fix_grad_clipping(optimizer) -> None:
    """Make ColossalAI's ZeRO gradient clipping use the true global gradient norm under expert parallelism.

    colossalai 0.5.0 (zero/low_level/low_level_optim.py step) adds the norms of its gradient stores linearly instead of
    in quadrature, and reduces the expert store's norm over the MoE data-parallel group only, so each EP rank sees a
    different, too large norm (measured 1.49 / 1.42 for a true 1.19) and clips by a different factor. Every rank's
    ZeRO partitions (dense over dp, experts over moe_dp, distinct experts across ep, distinct layers across pp: the
    stages share no parameter, lm_head being untied) are disjoint pieces of the full gradient, so one scalar
    all-reduce over the world of their squared norms gives the exact global norm, which we hand to the original
    clipping. tests/parallel/test_plugins.py checks it against a single process for ep, ep_zero and pp x ep.
    """
    import torch
    import torch.distributed as dist

    if not hasattr(optimizer, "_unscale_and_clip_grads"):
        return
    original = optimizer._unscale_and_clip_grads

    def unscale_and_clip(grad_groups_flat, total_norm):
        sq = torch.zeros((), dtype=torch.float64, device=grad_groups_flat[0].device if grad_groups_flat else "cpu")
        for g in grad_groups_flat:
            sq += g.detach().double().square().sum()
        dist.all_reduce(sq)
        norm = float(sq.sqrt())  # still multiplied by the fp16 loss scale, as the original expects
        scaler = getattr(optimizer.mixed_precision_mixin, "grad_scaler", None)  # fp16 only: the loss scale
        optimizer._current_grad_norm = norm / (scaler.scale.item() if scaler is not None else 1.0)
        original(grad_groups_flat, norm)

    optimizer._unscale_and_clip_grads = unscale_and_clip
