"""Workers for tests/parallel/test_expert_parallel.py and test_overlap.py (module-level so spawn can pickle them)."""

import os

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from openmoe.config import preset
from openmoe.moe import OpenMoeSparseMLP
from openmoe.parallel.expert_parallel import ExpertParallelMoE
from openmoe.parallel.hierarchical import hierarchical_comm


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


def run_ep(ep, rank, world, recompute=False) -> dict:
    """One forward/backward of `ep` on this rank's inputs; returns what the tests compare."""
    x, mask, grad = make_inputs(world)
    xr = x[rank].clone().requires_grad_(True)
    if recompute:  # as the decoder layers run it under activation checkpointing
        out, aux_loss, z_loss, counts = checkpoint(_losses_out, ep, xr, mask[rank], use_reentrant=False)
    else:
        out, aux_loss, z_loss, counts = _losses_out(ep, xr, mask[rank])
    ((out * grad[rank]).sum() + aux_loss + z_loss).backward()  # router losses reach the router weight too
    return {"out": out.detach(), "aux": aux_loss.detach(), "z": z_loss.detach(),
            "x_grad": xr.grad, "gate_grad": ep.gate_weight.grad,
            "expert_grads": {n: p.grad for n, p in ep.experts.named_parameters()},
            "slice": (ep.expert_slice.start, ep.expert_slice.stop), "counts": counts}


def _losses_out(ep, x, mask):
    out, aux = ep(x, mask)
    return out, aux.aux_loss, aux.z_loss, aux.tokens_per_expert


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


def overlap_worker(rank, world, cases, out_path):
    """For each (capacity_factor, chunks): plain EP layer, overlapped one, overlapped one under checkpointing."""
    results = {}
    for cf, chunks in cases:
        results[cf, chunks] = {
            "plain": run_ep(ExpertParallelMoE(make_layer(cf), dist.group.WORLD), rank, world),
            "overlap": run_ep(ExpertParallelMoE(make_layer(cf), dist.group.WORLD, comm_overlap=chunks), rank, world),
            "overlap_recompute": run_ep(ExpertParallelMoE(make_layer(cf), dist.group.WORLD, comm_overlap=chunks),
                                        rank, world, recompute=True),
        }
    ep = ExpertParallelMoE(make_layer(cases[0][0]), dist.group.WORLD, comm_overlap=cases[0][1]).eval()
    x, mask, _ = make_inputs(world)
    with torch.no_grad():  # eval forward (capacity_factor_eval) goes through the same pipeline without a graph
        results["eval"] = ep(x[rank], mask[rank])[0]
    ep.comm_overlap = 0
    with torch.no_grad():
        results["eval_plain"] = ep(x[rank], mask[rank])[0]
    torch.save(results, f"{out_path}/rank{rank}.pt")


def hierarchical_worker(rank, world, local_world_size, cf, out_path):
    """Hierarchical vs flat: the raw primitive against all_to_all_single, then the EP layer (forward and grads)."""
    g = torch.Generator().manual_seed(10 + rank)
    comm = hierarchical_comm(dist.group.WORLD, local_world_size)
    primitive = []
    for shape in [(world * 3, 5), (world, 2, 3), (world * 2,)]:
        x = torch.randn(shape, dtype=torch.float64, generator=g)
        want = torch.empty_like(x)
        dist.all_to_all_single(want, x)
        primitive.append((comm(x), want))
    flat = run_ep(ExpertParallelMoE(make_layer(cf), dist.group.WORLD), rank, world)
    os.environ["LOCAL_WORLD_SIZE"] = str(local_world_size)  # the layer reads the node size from the environment
    ep = ExpertParallelMoE(make_layer(cf), dist.group.WORLD, hierarchical=True)
    torch.save({"primitive": primitive, "nodes": (comm.num_nodes, comm.local_size), "shared": ep.hier_comm is comm,
                "flat": flat, "hierarchical": run_ep(ep, rank, world)}, f"{out_path}/rank{rank}.pt")
