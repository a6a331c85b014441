"""Baseline (b): the MoE formulation users had before, kept here (not in openmoe/) as a benchmark reference.

Shapes: T tokens, H hidden, I expert width, E experts, K top-k, C capacity.

Upstream ColossalAI's non-kernel MoE path: the router's decisions become a dense one-hot dispatch mask [T, E, C]
and a combine-weight tensor of the same shape; tokens reach the experts through an einsum with the mask (a
T x (E*C) x H matmul whose FLOPs grow with T^2 at fixed capacity factor), each expert is its own module run in a Python
loop over its [C, H] rows, and the outputs come back through a second einsum with the combine weights. Wrapped in
plain torch DDP by the benchmark (no expert parallelism: every GPU holds every expert).

The router is ours (`openmoe.router.route`: same top-k, capacity, priority, drops and combine weights) and the loss
terms are ours (`moe_aux`), so the layer computes exactly what `OpenMoeSparseMLP` computes
(tests/parallel/test_bench.py checks outputs and gradients); only the data movement differs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from openmoe.moe import MoeAux, OpenMoeSparseMLP, moe_aux


class NaiveExpert(nn.Module):
    """One expert as its own module (upstream's per-expert layout): act(x @ wi_gate) * (x @ wi_up) @ wo."""

    def __init__(self, wi_gate: torch.Tensor, wi_up: torch.Tensor, wo: torch.Tensor, act):
        super().__init__()
        self.wi_gate, self.wi_up, self.wo = nn.Parameter(wi_gate), nn.Parameter(wi_up), nn.Parameter(wo)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [C, H] -> [C, H]
        return (self.act(x @ self.wi_gate) * (x @ self.wi_up)) @ self.wo


class _PerExpertMLP(nn.Module):
    """What both baselines share: the router of an OpenMoeSparseMLP (the same gate Parameter, our routing) and one
    module per expert (copies of the stacked weights, as the published modelings hold them)."""

    route = OpenMoeSparseMLP.route

    def __init__(self, sparse: OpenMoeSparseMLP):
        super().__init__()
        for attr in ("num_experts", "top_k", "capacity_factor_train", "capacity_factor_eval", "min_capacity",
                     "drop_tokens", "router_combine", "router_aux_loss_type", "selection_bias"):
            setattr(self, attr, getattr(sparse, attr))
        self.gate_weight = sparse.gate_weight  # the same Parameter
        stacked = sparse.experts
        # per-expert copies: indexing one stacked Parameter per expert would make autograd materialise a full-size
        # gradient for every expert (select_backward), which upstream's per-module experts never did
        self.experts = nn.ModuleList(
            NaiveExpert(stacked.wi_gate.data[e].clone(), stacked.wi_up.data[e].clone(), stacked.wo.data[e].clone(),
                        stacked.act) for e in range(stacked.num_local_experts))

    @classmethod
    def from_sparse(cls, sparse: OpenMoeSparseMLP):
        return cls(sparse)


class NaiveSparseMLP(_PerExpertMLP):
    """Drop-in for `OpenMoeSparseMLP` (same forward signature and returns). Build with `from_sparse`."""

    sizes_dropless_buffer = True  # the dense mask needs a capacity even when dropless (the max load, a host read)

    def forward(self, hidden: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, MoeAux]:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])  # [T, H]
        r = self.route(x, None if token_mask is None else token_mask.reshape(-1))
        e_hot = F.one_hot(r.expert_idx, self.num_experts).to(x.dtype)  # [T, K, E]
        c_hot = F.one_hot(r.slot.clamp(max=r.capacity - 1), r.capacity).to(x.dtype)  # [T, K, C]; dropped: keep=0
        dispatch_mask = torch.einsum("tke,tkc->tec", e_hot * r.keep[..., None].to(x.dtype), c_hot)  # [T, E, C]
        combine_weights = torch.einsum("tke,tkc->tec", e_hot * r.combine_weight[..., None].to(x.dtype), c_hot)
        expert_in = torch.einsum("tec,th->ech", dispatch_mask, x)  # [E, C, H]
        expert_out = torch.stack([expert(expert_in[e]) for e, expert in enumerate(self.experts)])  # [E, C, H]
        out = torch.einsum("tec,ech->th", combine_weights, expert_out)  # [T, H]
        return out.view(shape), moe_aux(r, self.router_aux_loss_type, shape[:-1])


def swap_moe_(model: nn.Module, layer_cls) -> nn.Module:
    """Replace every OpenMoeSparseMLP of an OpenMoeForCausalLM by layer_cls built from it (same weights), in place."""
    for layer in model.model.layers:
        if isinstance(layer.mlp, OpenMoeSparseMLP):
            layer.mlp = layer_cls.from_sparse(layer.mlp)
    return model


def naive_model_(model: nn.Module) -> nn.Module:
    """Baseline (b): every OpenMoeSparseMLP replaced by the naive [T, E, C] einsum layer."""
    return swap_moe_(model, NaiveSparseMLP)


class LoopSparseMLP(_PerExpertMLP):
    """Baseline (c): the per-expert loop of the published modelings (HF Mixtral's and OpenMoE's reference
    formulation): per-expert modules; for each expert, find its (token, choice) pairs (`torch.where`: a device->host
    sync per expert), run it on those rows, weight them, `index_add_` them back. No capacity buffer, no padding, no
    all-to-all: meant to run data-parallel (FSDP2 in the benchmark). Routing is ours, as in NaiveSparseMLP."""

    sizes_dropless_buffer = False  # the loop needs no capacity

    def forward(self, hidden: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, MoeAux]:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])  # [T, H]
        r = self.route(x, None if token_mask is None else token_mask.reshape(-1))
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, k = torch.where(r.keep & (r.expert_idx == e))  # [N_e] each: host sync for the size
            y = expert(x[tok]) * r.combine_weight[tok, k, None].to(x.dtype)  # [N_e, H]
            out.index_add_(0, tok, y)
        return out.view(shape), moe_aux(r, self.router_aux_loss_type, shape[:-1])


def loop_model_(model: nn.Module) -> nn.Module:
    """Baseline (c): every OpenMoeSparseMLP replaced by the per-expert loop layer."""
    return swap_moe_(model, LoopSparseMLP)
