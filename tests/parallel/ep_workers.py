"""Workers for tests/parallel/test_expert_parallel.py (module-level so spawn can pickle them)."""

import torch
import torch.distributed as dist

from openmoe.config import preset
from openmoe.moe import OpenMoeSparseMLP
from openmoe.parallel.expert_parallel import ExpertParallelMoE


def make_layer(cf: float, seed: int = 0) -> OpenMoeSparseMLP:
    torch.manual_seed(seed)
    layer = OpenMoeSparseMLP(preset("tiny", num_experts=4)).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    layer.capacity_factor_train = cf
    return layer


def make_inputs(world: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(world, 3, 5, 64, dtype=torch.float64, generator=g)
    mask = torch.ones(world, 3, 5, dtype=torch.bool)
    mask[0, 2, 3:] = False  # some padding on rank 0
    grad = torch.randn(world, 3, 5, 64, dtype=torch.float64, generator=g)
    return x, mask, grad


def ep_layer_worker(rank, world, cf, out_path):
    layer = make_layer(cf)
    ep = ExpertParallelMoE(layer, dist.group.WORLD)
    x, mask, grad = make_inputs(world)
    xr = x[rank].clone().requires_grad_(True)
    out, aux = ep(xr, mask[rank])
    (out * grad[rank]).sum().backward()
    torch.save({"out": out.detach(), "aux": aux.aux_loss.detach(), "z": aux.z_loss.detach(),
                "x_grad": xr.grad, "gate_grad": ep.gate_weight.grad,
                "expert_grads": {n: p.grad for n, p in ep.experts.named_parameters()},
                "slice": (ep.expert_slice.start, ep.expert_slice.stop), "counts": aux.tokens_per_expert},
               f"{out_path}/rank{rank}.pt")
