"""The parallel layout: how many ranks hold each expert, each dense parameter and each layer. Pure and validated up
front: every error names the numbers involved and what would be accepted. `run` is the training run configuration
(openmoe.train.config.RunConfig; read duck-typed so that this package never imports `train`).

  plugin   | ep_size                   | MoE data parallel (replicas of each expert) | pipeline
  ---------+---------------------------+---------------------------------------------+----------
  ep       | world                     | 1                                           | no
  ep_zero  | world / extra_dp_size     | extra_dp_size (ZeRO shards across them)     | no
  hybrid   | --ep_size                 | world / (pp_size * ep_size)                 | pp_size

Dense parameters are data-parallel over world / pp_size ranks in all three.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from openmoe.config import OpenMoeConfig
from openmoe.parallel.load_balance import check_load_balance


@dataclass(frozen=True)
class ParallelSizes:
    world: int
    ep: int
    pp: int
    moe_dp: int  # replicas of each expert
    dp: int  # replicas of each dense parameter (= world / pp)
    num_microbatches: int = 1  # pipeline micro-batches per step (1 without pipeline)
    layers_per_stage: tuple[int, ...] = ()  # decoder layers held by each pipeline stage (empty without pipeline)


def resolve_sizes(run, model: OpenMoeConfig, world: int) -> ParallelSizes:
    """Validate every size up front; each error names the numbers involved and what would be accepted."""
    par = run.parallel
    ep, pp = _plugin_sizes(par, model, world)
    if par.ep_size is not None and par.ep_size != ep:
        raise ValueError(f"--ep_size {par.ep_size} contradicts --plugin {par.plugin} on {world} ranks, "
                         f"which implies ep_size {ep}")
    if model.num_experts % ep:
        raise ValueError(f"num_experts ({model.num_experts}) must be divisible by ep_size ({ep})")
    moe_dp = world // (pp * ep)
    if par.dp_size is not None and par.dp_size != moe_dp:
        raise ValueError(f"--dp_size {par.dp_size} contradicts the layout: {world} ranks / (pp_size {pp} * ep_size "
                         f"{ep}) gives {moe_dp} replicas of each expert; accepted: --dp_size {moe_dp} or none")
    _check_zero(par, ep, pp)
    zero_step_options(run, pp)  # an explicit --lean_zero / --adamw_kernel that cannot run fails here, with the rest
    _check_moe_options(run, pp)
    sizes = ParallelSizes(world=world, ep=ep, pp=pp, moe_dp=moe_dp, dp=world // pp)
    check_load_balance(run, sizes)
    return _pipeline_sizes(run, model, sizes) if pp > 1 else sizes


def _plugin_sizes(par, model: OpenMoeConfig, world: int) -> tuple[int, int]:
    """(ep, pp) that --plugin implies on `world` ranks."""
    if par.tp_size != 1 or par.sp_size != 1:
        raise ValueError(f"tensor/sequence parallelism is not supported for OpenMoE (tp_size={par.tp_size}, "
                         f"sp_size={par.sp_size}); accepted: 1. Use ep/ep_zero/hybrid to scale")
    if par.plugin != "hybrid" and par.pp_size != 1:
        raise ValueError(f"pp_size ({par.pp_size}) > 1 needs --plugin hybrid (got '{par.plugin}')")
    if par.plugin != "ep_zero" and par.extra_dp_size != 1:
        raise ValueError(f"extra_dp_size ({par.extra_dp_size}) is for --plugin ep_zero only (got '{par.plugin}')")
    if par.plugin == "ep":
        return world, 1
    if par.plugin == "ep_zero":
        if par.extra_dp_size < 1 or world % par.extra_dp_size:
            raise ValueError(f"world size ({world}) must be divisible by extra_dp_size ({par.extra_dp_size})")
        return world // par.extra_dp_size, 1
    if par.ep_size is None:
        raise ValueError("--plugin hybrid needs --ep_size")
    ep, pp = par.ep_size, par.pp_size
    if pp < 1 or world % (pp * ep):
        raise ValueError(f"world size ({world}) must be divisible by pp_size ({pp}) * ep_size ({ep})")
    if pp > model.num_hidden_layers:
        raise ValueError(f"pp_size ({pp}) exceeds the number of layers ({model.num_hidden_layers})")
    if pp > 1 and par.zero_stage > 1:
        raise ValueError(f"zero_stage ({par.zero_stage}) must be <= 1 with pipeline parallelism")
    return ep, pp


def _check_zero(par, ep: int, pp: int) -> None:
    if ep > 1 and par.zero_stage < 1:
        raise ValueError(f"expert parallelism (ep_size {ep}) needs zero_stage >= 1 in ColossalAI's MoE plugin "
                         f"(got {par.zero_stage})")
    if par.zero_stage >= 1 and par.precision == "fp32":
        raise ValueError(f"zero_stage {par.zero_stage} needs --precision bf16 or fp16 (ColossalAI's ZeRO keeps "
                         f"fp32 master weights itself); got fp32")
    if par.zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage ({par.zero_stage}) must be 0, 1 or 2")
    if par.overlap_communication and (par.zero_stage < 1 or pp > 1):
        raise ValueError(f"--overlap_communication overlaps ZeRO's gradient reduction with backward: it needs "
                         f"zero_stage >= 1 (got {par.zero_stage}) and no pipeline (pp_size {pp}; with a pipeline "
                         f"ColossalAI reduces once after the schedule, so there is nothing to overlap)")
    if par.offload_optimizer and (par.zero_stage < 1 or pp > 1):
        raise ValueError(f"--offload_optimizer keeps ZeRO's optimizer state in host memory: it needs zero_stage >= 1 "
                         f"(got {par.zero_stage}) and no pipeline (pp_size {pp}; not supported with a pipeline)")


def zero_step_options(run, pp: int, own_optimizer: bool = True) -> dict[str, bool]:
    """{"lean_zero": ..., "adamw_kernel": ...}: the run's --lean_zero and --adamw_kernel decided for a layout of pp
    pipeline stages. Unset (None, auto): on exactly where supported; an explicit True that cannot run raises; an
    explicit False stays off. own_optimizer: the run's AdamW (build_optimizer); a caller's optimizer (build's
    make_optimizer) gets --adamw_kernel only when asked for, and then openmoe/optim_kernels.py check_adamw judges it."""
    par, asked_lean, asked_kernel = run.parallel, run.parallel.lean_zero, run.kernels.adamw_kernel
    # lean_zero1 also refuses ZeRO options that build_plugin never sets (overlap_allgather, fp8 or a communication
    # dtype, no fp32 masters, a 2-D data-parallel group): these three are what a run can ask for
    needs = (f"zero_stage 1 (got {par.zero_stage}), no --overlap_communication (got {par.overlap_communication}) "
             f"and no pipeline (pp_size {pp})")
    lean_ok = par.zero_stage == 1 and not par.overlap_communication and pp == 1
    if asked_lean and not lean_ok:
        raise ValueError(f"--lean_zero replaces ZeRO-1's gradient reduction after backward and its optimizer step: it "
                         f"needs {needs}")
    lean = lean_ok if asked_lean is None else asked_lean
    if asked_kernel and not lean:
        why = "drop --no-lean_zero" if asked_lean is False else f"that needs {needs}"
        raise ValueError(f"--adamw_kernel is part of --lean_zero's optimizer step; {why}, or drop --adamw_kernel")
    if asked_kernel and par.offload_optimizer:
        raise ValueError("--adamw_kernel runs on the device; with --offload_optimizer the optimizer step runs on the "
                         "host (torch's fused AdamW): drop one of the two")
    if asked_kernel is not None:
        return {"lean_zero": lean, "adamw_kernel": asked_kernel}
    return {"lean_zero": lean, "adamw_kernel": lean and own_optimizer and not par.offload_optimizer
            and _adamw_kernel_runs_here()}


def _adamw_kernel_runs_here() -> bool:
    """The AdamW pass runs in torch ops on the CPU and as a Triton kernel on CUDA (the run's device when one is
    visible, as colossalai's accelerator picks it)."""
    import torch

    from openmoe.optim_kernels import HAS_TRITON

    return HAS_TRITON or not torch.cuda.is_available()


def _check_moe_options(run, pp: int) -> None:
    par, dropless = run.parallel, run.kernels.dropless
    if par.comm_overlap < 0:
        raise ValueError(f"--comm_overlap ({par.comm_overlap}) must be >= 0 (number of chunks; 0 is off)")
    if par.comm_overlap and (dropless or par.hierarchical_alltoall):
        raise ValueError("--comm_overlap works with capacity routing and the flat all-to-all: drop --dropless and "
                         "--hierarchical_alltoall, or --comm_overlap")
    if run.balance.balance_mode == "bias" and pp > 1:
        raise ValueError("--balance_mode bias is not supported with pipeline parallelism yet (pp_size "
                         f"{pp}); use --plugin ep or ep_zero")
    if par.hierarchical_alltoall and dropless:
        raise ValueError("--hierarchical_alltoall needs equal splits (capacity routing): drop --dropless")
    if run.kernels.use_layernorm_kernel:
        from openmoe.kernels import fused_rmsnorm_kernel

        fused_rmsnorm_kernel()  # raises the one-line error when apex is missing


def _pipeline_sizes(run, model: OpenMoeConfig, sizes: ParallelSizes) -> ParallelSizes:
    from openmoe.parallel.pipeline import stage_ranges

    par, opt = run.parallel, run.optim

    if par.microbatch_size < 1 or opt.batch_size % par.microbatch_size:
        raise ValueError(f"batch_size ({opt.batch_size}) must be divisible by microbatch_size "
                         f"({par.microbatch_size})")
    num_microbatches = opt.batch_size * opt.grad_accum // par.microbatch_size
    if num_microbatches < sizes.pp:
        raise ValueError(f"batch_size ({opt.batch_size}) * grad_accum ({opt.grad_accum}) / microbatch_size "
                         f"({par.microbatch_size}) = {num_microbatches} micro-batches per step, fewer than the "
                         f"{sizes.pp} pipeline stages; the 1F1B schedule needs at least one per stage")
    ranges = stage_ranges(model.num_hidden_layers, sizes.pp)
    for i, layers in enumerate(ranges):
        # ColossalAI's MoE ZeRO optimizer refuses a rank without expert parameters
        if not any(model.is_moe_layer(j) for j in layers):
            raise ValueError(f"pipeline stage {i} of {sizes.pp} would hold layers {layers.start}..{layers.stop - 1}, "
                             f"none of them MoE (every {model.moe_layer_interval}th layer is); each stage needs "
                             f"at least one: use a smaller pp_size")
    return replace(sizes, num_microbatches=num_microbatches, layers_per_stage=tuple(len(r) for r in ranges))


