"""Expert-parallel dropless layer with grouped-GEMM experts (expert_impl "grouped") on 2 gloo ranks == the
obviously-correct per-token loop (`reference_moe_forward`) run on one process: outputs, router decisions, gradients.

fp32 (torch._grouped_mm has no fp64 kernel); tolerance 1e-5 relative to each tensor's scale. Two cases in one
launch: routing as initialised (both ranks receive tokens) and a router tilted so that every token picks experts of
rank 0 (rank 1 receives no rows and runs its empty fallback; its expert gradients must be exactly zero).
"""

import torch
import torch.distributed as dist

from openmoe.config import preset
from openmoe.moe import OpenMoeSparseMLP, moe_aux, reference_moe_forward
from openmoe.parallel.expert_parallel import ExpertParallelMoE
from tests.helpers import launch

WORLD, E = 2, 4
CASES = ("random", "all_to_rank0")


def make_layer(case: str) -> OpenMoeSparseMLP:
    torch.manual_seed(0)
    layer = OpenMoeSparseMLP(preset("tiny", num_experts=E))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    layer.capacity_factor_train = 0.0  # dropless
    if case == "all_to_rank0":  # experts 0, 1 live on EP rank 0: make their logits win for every token
        with torch.no_grad():
            layer.gate_weight[:2] = 0.0
            layer.gate_weight[2:] = 0.0
            layer.gate_weight[:2, 0] = 1.0
    return layer


def make_inputs(case: str):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD, 3, 6, 64, generator=g)
    if case == "all_to_rank0":
        x[..., 0] = x[..., 0].abs() + 1.0  # positive feature 0: experts 0 and 1 hold the two largest logits
    mask = torch.ones(WORLD, 3, 6, dtype=torch.bool)
    mask[0, 2, 4:] = False  # some padding on rank 0
    return x, mask, torch.randn(WORLD, 3, 6, 64, generator=g)


def worker(rank, world, out_path):
    results = {}
    for case in CASES:
        ep = ExpertParallelMoE(make_layer(case), dist.group.WORLD, expert_impl="grouped")
        ep.train()
        x, mask, grad = make_inputs(case)
        xr = x[rank].clone().requires_grad_(True)
        out, aux = ep(xr, mask[rank])
        ((out * grad[rank]).sum() + aux.aux_loss + aux.z_loss).backward()
        results[case] = {"out": out.detach(), "x_grad": xr.grad, "gate_grad": ep.gate_weight.grad,
                         "counts": aux.tokens_per_expert, "dropped": aux.dropped_fraction,
                         "expert_grads": {n: p.grad for n, p in ep.experts.named_parameters()}}
    torch.save(results, f"{out_path}/rank{rank}.pt")


def close(a, b, what):
    scale = b.abs().max().clamp(min=1.0)
    assert (a - b).abs().max() <= 1e-5 * scale, f"{what}: max diff {(a - b).abs().max():.3g}"


def test_ep_grouped_dropless_matches_reference_loop(tmp_path):
    launch(worker, WORLD, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for case in CASES:
        ref = make_layer(case)
        ref.train()
        x, mask, grad = make_inputs(case)
        xs = x.clone().requires_grad_(True)
        total = 0.0
        for r in range(WORLD):
            got = ranks[r][case]
            out, route = reference_moe_forward(ref, xs[r], mask[r])
            aux = moe_aux(route, ref.router_aux_loss_type, xs[r].shape[:-1])
            total = total + (out * grad[r]).sum() + aux.aux_loss + aux.z_loss
            assert torch.equal(got["counts"], aux.tokens_per_expert), case  # router decisions
            assert float(got["dropped"]) == 0.0 == float(aux.dropped_fraction), case
            close(got["out"], out.detach(), f"{case} rank {r} output")
        total.backward()
        for r in range(WORLD):
            got = ranks[r][case]
            close(got["x_grad"], xs.grad[r], f"{case} rank {r} input gradient")
        close(sum(rk[case]["gate_grad"] for rk in ranks), ref.gate_weight.grad, f"{case} router gradient")
        for r in range(WORLD):
            lo = r * (E // WORLD)
            for name, g in ranks[r][case]["expert_grads"].items():
                want = getattr(ref.experts, name).grad[lo : lo + E // WORLD] / WORLD  # 1/ep: expert_parallel.py
                close(g, want, f"{case} rank {r} {name} gradient")
        if case == "all_to_rank0":
            assert ranks[1][case]["counts"][2:].sum() == 0 and ranks[0][case]["counts"][2:].sum() == 0
            assert all(torch.count_nonzero(g) == 0 for g in ranks[1][case]["expert_grads"].values())
