"""Moving whole tensors in and out of an expert-parallel (and pipelined) model: each EP rank reads only its experts
from an HF-format checkpoint, and the single-device (published-layout) state dict is gathered on global rank 0.
`model` here is a boosted model (`.unwrap()` gives ours; `.stage_manager` is set with a pipeline)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from openmoe.io.hf import check_state_dict, read_tensors
from openmoe.parallel.expert_parallel import ExpertParallelMoE
from openmoe.parallel.load_balance import ExpertPlacement


def ep_layer_lookup(module: torch.nn.Module):
    """key -> the ExpertParallelMoE whose sharded experts hold that state-dict key, or None."""
    prefixes = {name + ".experts.": m for name, m in module.named_modules() if isinstance(m, ExpertParallelMoE)}
    return lambda key: next((m for p, m in prefixes.items() if key.startswith(p)), None)

def load_model_weights(module: torch.nn.Module, directory: str) -> None:
    """Copy an HF-format checkpoint into a (possibly expert-parallel, pipelined) model: each EP rank reads only its
    experts, each pipeline stage only the parameters it holds."""
    ep_layer = ep_layer_lookup(module)
    unheld = unheld_parameters(module)

    def select(key):
        if key in unheld:
            return False
        layer = ep_layer(key)
        return layer.expert_slice if layer is not None else None

    tensors = read_tensors(directory, select)
    params = module.state_dict(keep_vars=True)
    check_state_dict({k: v.shape for k, v in params.items()}, tensors, directory)
    with torch.no_grad():
        for key, p in params.items():
            p.data.copy_(tensors[key])

def unheld_parameters(module: torch.nn.Module) -> set[str]:
    """Names of the parameters another pipeline stage holds (ColossalAI sets them to None on this one)."""
    return {f"{name}.{p}" if name else p for name, m in module.named_modules()
            for p, v in m._parameters.items() if v is None}

def gather_experts(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate EP-sharded expert tensors (keyed like module.state_dict()) into full [E, ...] tensors, on CPU.

    Collective over every EP group: the ranks of one group must call it with the same keys (they hold the same stage).
    """
    ep_layer = ep_layer_lookup(module)
    out = {}
    for key, t in tensors.items():
        layer = ep_layer(key)
        if layer is not None and layer.ep_size > 1:
            parts = [torch.empty_like(t) for _ in range(layer.ep_size)]
            dist.all_gather(parts, t.contiguous(), group=layer.ep_group)
            t = torch.cat(parts, dim=0)
        out[key] = t.detach().cpu()
    return out

def gather_full(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Tensors keyed like the unwrapped model's state dict (e.g. its parameters or their gradients), in the published
    single-device layout on global rank 0 (None elsewhere): experts gathered over EP, then the pipeline stages' dicts
    merged. Collective over the whole world."""
    local = gather_experts(model.unwrap(), tensors)
    stages = model.stage_manager
    if stages is None:
        return local if dist.get_rank() == 0 else None
    if 0 not in dist.get_process_group_ranks(stages.p2p_group):
        return None  # another data-parallel replica of the same stages
    parts = [None] * stages.num_stages if dist.get_rank() == 0 else None
    dist.gather_object(local, parts, dst=0, group=stages.p2p_group)
    return {k: v for part in parts for k, v in part.items()} if parts is not None else None

def full_state_dict(model, placement: ExpertPlacement | None = None) -> dict[str, torch.Tensor] | None:
    """The single-device (published-layout) state dict of a boosted model, on global rank 0; experts and router rows
    in logical order when a placement has moved them."""
    sd = gather_full(model, model.unwrap().state_dict())
    return placement.to_logical_state_dict(sd) if sd is not None and placement is not None else sd

def moe_layers(model) -> list[ExpertParallelMoE]:
    """The boosted model's expert-parallel MoE layers, in forward order (the order of every [layers, E] count)."""
    return [m for m in model.unwrap().modules() if isinstance(m, ExpertParallelMoE)]
