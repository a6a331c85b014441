"""Expert-parallel dropless layer with grouped-GEMM experts (expert_impl "grouped") on 2 gloo ranks == the
obviously-correct per-token loop (`reference_moe_forward`) run on one process: outputs, router decisions, gradients.

fp32 (torch._grouped_mm has no fp64 kernel); tolerance 1e-5 relative to each tensor's scale. Two cases in one
launch: routing as initialised (both ranks receive tokens) and a router tilted so that every token picks experts of
rank 0 (rank 1 receives no rows and runs its empty fallback; its expert gradients must be exactly zero). Each case
twice: with exact split sizes read on the host, and with --padded_dispatch's fixed blocks (dispatch_tokens 20 for
18-token micro-batches, so every block carries zero rows past the routed ones; no host sync), against the same loop.
"""

import torch
import torch.distributed as dist

from openmoe.config import preset
from openmoe.moe import OpenMoeSparseMLP, moe_aux, reference_moe_forward
from openmoe.parallel.expert_parallel import ExpertParallelMoE
from tests.helpers import launch

WORLD, E = 2, 4
CASES = ("random", "all_to_rank0")
PADDED = (0, 20)  # dispatch_tokens: 0 = exact splits; 20 >= the 3 x 6 tokens per rank


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
        for padded in PADDED:
            ep = ExpertParallelMoE(make_layer(case), dist.group.WORLD, expert_impl="grouped", dispatch_tokens=padded)
            ep.train()
            x, mask, grad = make_inputs(case)
            xr = x[rank].clone().requires_grad_(True)
            out, aux = ep(xr, mask[rank])
            ((out * grad[rank]).sum() + aux.aux_loss + aux.z_loss).backward()
            results[case, padded] = {"out": out.detach(), "x_grad": xr.grad, "gate_grad": ep.gate_weight.grad,
                                     "counts": aux.tokens_per_expert, "dropped": aux.dropped_fraction,
                                     "expert_grads": {n: p.grad for n, p in ep.experts.named_parameters()}}
    small = ExpertParallelMoE(make_layer("random"), dist.group.WORLD, expert_impl="grouped", dispatch_tokens=17)
    try:  # refused on the host before any collective: every rank raises alike
        small.train()(make_inputs("random")[0][rank], None)
    except ValueError as e:
        results["too_many_tokens"] = str(e)
    torch.save(results, f"{out_path}/rank{rank}.pt")


def close(a, b, what):
    scale = b.abs().max().clamp(min=1.0)
    assert (a - b).abs().max() <= 1e-5 * scale, f"{what}: max diff {(a - b).abs().max():.3g}"


def test_ep_grouped_dropless_matches_reference_loop(tmp_path):
    launch(worker, WORLD, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for rk in ranks:
        assert rk["too_many_tokens"] == ("padded dispatch: this micro-batch has 18 tokens, more than dispatch_tokens "
                                         "(17, batch_size x max_length); accepted: at most that many")
    for case, padded in [(c, p) for c in CASES for p in PADDED]:
        ref = make_layer(case)
        ref.train()
        x, mask, grad = make_inputs(case)
        xs = x.clone().requires_grad_(True)
        total = 0.0
        for r in range(WORLD):
            got = ranks[r][case, padded]
            out, route = reference_moe_forward(ref, xs[r], mask[r])
            aux = moe_aux(route, ref.router_aux_loss_type, xs[r].shape[:-1])
            total = total + (out * grad[r]).sum() + aux.aux_loss + aux.z_loss
            assert torch.equal(got["counts"], aux.tokens_per_expert), case  # router decisions
            assert float(got["dropped"]) == 0.0 == float(aux.dropped_fraction), case
            close(got["out"], out.detach(), f"{case}/{padded} rank {r} output")
        total.backward()
        for r in range(WORLD):
            got = ranks[r][case, padded]
            close(got["x_grad"], xs.grad[r], f"{case}/{padded} rank {r} input gradient")
        close(sum(rk[case, padded]["gate_grad"] for rk in ranks), ref.gate_weight.grad,
              f"{case}/{padded} router gradient")
        for r in range(WORLD):
            lo = r * (E // WORLD)
            for name, g in ranks[r][case, padded]["expert_grads"].items():
                want = getattr(ref.experts, name).grad[lo : lo + E // WORLD] / WORLD  # 1/ep: expert_parallel.py
                close(g, want, f"{case}/{padded} rank {r} {name} gradient")
        if case == "all_to_rank0":
            assert ranks[1][case, padded]["counts"][2:].sum() == 0 and ranks[0][case, padded]["counts"][2:].sum() == 0
            assert all(torch.count_nonzero(g) == 0 for g in ranks[1][case, padded]["expert_grads"].values())
