"""Experts and the single-device MoE layer. Shapes: B batch, S seq, T tokens, H hidden, I intermediate,
E experts, E_l local experts, K top-k, C capacity.

Dispatch and combine are index-based (scatter into / gather from an [E, C, H] buffer), never the dense [T, E, C]
one-hot einsum of the old ColossalAI code. The expert-parallel layer (openmoe/parallel/expert_parallel.py) reuses
`dispatch`, `combine`, the router and `OpenMoeExperts` and adds only the all-to-all between them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import OpenMoeConfig
from .losses import router_aux_loss, router_aux_loss_seq, router_z_loss
from .router import RouterOutput, count_choices, route, sort_by_expert


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """OpenMoE's "double-gated" activation: split the 2I-wide gate projection in halves, x1 * silu(x2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x1 * F.silu(x2)


class StackedExperts(nn.Module):
    """Stacked gated-MLP experts (x @ W): wi_gate [E, H, gate_multiple * I], wi_up [E, H, I], wo [E, I, H];
    expert e computes act(x @ wi_gate[e]) * (x @ wi_up[e]) @ wo[e]. Subclasses fix `act` and `gate_multiple`; the
    expert-parallel layer slices all three along E and calls forward / forward_grouped."""

    gate_multiple: int
    act = None  # staticmethod: gate activations [..., gate_multiple * I] -> [..., I]
    gated_fn = None  # instance override of `gated`: its compiled form (openmoe.kernels.compile_blocks)

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.wi_gate = nn.Parameter(torch.empty(num_experts, hidden_size, self.gate_multiple * intermediate_size))
        self.wi_up = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.wo = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))

    @property
    def num_local_experts(self) -> int:
        return self.wi_gate.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [E_l, C, H] -> [E_l, C, H]: expert e processes row e of the buffer (one batched matmul per weight)."""
        h = self.gated(torch.bmm(x, self.wi_gate), torch.bmm(x, self.wi_up))  # [E_l, C, I]
        return torch.bmm(h, self.wo)

    def gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """act(gate) * up, the memory-bound step between the GEMMs (one fused kernel each way when compiled)."""
        return self.act(gate) * up if self.gated_fn is None else self.gated_fn(gate, up)

    def forward_grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [N, H] rows sorted by expert, counts [E_l] rows per expert -> [N, H].

        One grouped GEMM per weight (torch._grouped_mm): no capacity padding, so no FLOPs on empty slots.
        """
        offs = counts.cumsum(0).to(torch.int32)
        x = _ContiguousGrad.apply(x)
        h = self.gated(torch._grouped_mm(x, self.wi_gate, offs=offs), torch._grouped_mm(x, self.wi_up, offs=offs))
        return torch._grouped_mm(h, self.wo, offs=offs)

    def forward_one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on tokens x [N, H] (reference path)."""
        return (self.act(x @ self.wi_gate[e]) * (x @ self.wi_up[e])) @ self.wo[e]


class OpenMoeExperts(StackedExperts):
    """Published OpenMoE layout: wi_gate [E, H, 2I] (double-gated), wi_up [E, H, I], wo [E, I, H].
    openmoe/parallel/overlap.py has a hand-written backward for exactly this class."""

    gate_multiple = 2
    act = staticmethod(swiglu)


class LlamaExperts(StackedExperts):
    """Standard 3-matrix SwiGLU per expert (LLaMA MLP, Mixtral expert): silu(x @ wi_gate) * (x @ wi_up) @ wo with
    wi_gate [E, H, I], wi_up [E, H, I], wo [E, I, H]. Mixtral's w1 / w3 / w2 weights are wi_gate[e].T / wi_up[e].T /
    wo[e].T; a LLaMA MLP's gate_proj / up_proj / down_proj weights are the same transposes."""

    gate_multiple = 1
    act = staticmethod(F.silu)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient dense: _grouped_mm's backward rejects expanded
    (zero-stride) gradients such as the one `.sum()` produces."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _buffer_rows(r: RouterOutput, num_experts: int) -> torch.Tensor:
    """[T, K] row of each (token, choice) in the flattened [E * C] buffer; dropped and padding choices point at row
    E * C, a scratch row past the end. Fixed-size index math on the device: no `nonzero`, so no host sync."""
    return torch.where(r.keep, r.expert_idx * r.capacity + r.slot, num_experts * r.capacity)


def dispatch(x: torch.Tensor, r: RouterOutput, num_experts: int) -> torch.Tensor:
    """Scatter kept choices into an [E, C, H] buffer; empty slots stay zero. x [T, H].

    Every (token, choice) pair is written, the dropped ones into one scratch row that is cut off afterwards (its
    gradient is zero, so dropped choices send no gradient to x). Kept rows are unique, so the copy is exact.
    """
    t, k = r.keep.shape
    rows = _buffer_rows(r, num_experts).reshape(-1)  # [T*K]
    src = x[:, None].expand(t, k, x.shape[-1]).reshape(t * k, -1)  # [T*K, H]: token t for each of its choices
    buf = x.new_zeros(num_experts * r.capacity + 1, x.shape[-1]).index_copy(0, rows, src)
    return buf[:-1].view(num_experts, r.capacity, -1)


def combine(y: torch.Tensor, r: RouterOutput, num_tokens: int) -> torch.Tensor:
    """Gather each kept choice's expert output, weight it, sum over choices. y [E, C, H] -> [T, H].

    Dropped choices gather row 0 and are zeroed by a select (not a multiply: a non-finite row 0 must not leak).
    """
    t, k = r.keep.shape
    rows = torch.where(r.keep, r.expert_idx * r.capacity + r.slot, 0)  # [T, K]
    picked = y.reshape(-1, y.shape[-1])[rows.reshape(-1)].view(t, k, -1)  # [T, K, H]
    picked = torch.where(r.keep[..., None], picked * r.combine_weight[..., None].to(y.dtype), 0)
    return picked.sum(dim=1)  # [T, H]


def grouped_experts(experts: StackedExperts, x: torch.Tensor, r: RouterOutput) -> torch.Tensor:
    """All (token, choice) pairs sorted by expert, dropped ones last -> grouped GEMMs -> weighted sum. x [T, H].

    No host sync: the group offsets stay on the device, and the rows past the last offset (dropped choices), which
    _grouped_mm leaves unwritten, are masked by selects on the way in (their garbage input gradient) and out.
    """
    t, k = r.keep.shape
    e = experts.num_local_experts
    key = torch.where(r.keep, r.expert_idx, e).reshape(-1)  # [T*K]; e = dropped
    order = sort_by_expert(key)
    counts = count_choices(key, e)  # kept choices per expert
    valid = (key[order] < e)[:, None]  # [T*K, 1]
    xs = torch.where(valid, x[order // k], 0)  # [T*K, H]
    y = torch.where(valid, experts.forward_grouped(xs, counts), 0)
    w = r.combine_weight.reshape(-1)[order].to(y.dtype)
    out = y.new_zeros(t * k, y.shape[-1]).index_copy(0, order, y * w[:, None])  # back to (token, choice) order
    return out.view(t, k, -1).sum(dim=1)


@dataclass
class MoeAux:
    """What an MoE layer returns beside its output: its router losses (unweighted) and load statistics."""

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor  # [E]
    dropped_fraction: torch.Tensor


class OpenMoeSparseMLP(nn.Module):
    """Router + stacked experts on one device. State-dict keys: `gate_weight`, `experts.{wi_gate,wi_up,wo}`.
    Experts are OpenMoeExperts (model_family "openmoe") or LlamaExperts ("llama_moe"), config.expert_intermediate_size
    wide. The expert-parallel layer copies the routing attributes set here (top_k ... router_aux_loss_type)."""

    def __init__(self, config: OpenMoeConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.router_topk
        self.capacity_factor_train = config.router_capacity_factor_train
        self.capacity_factor_eval = config.router_capacity_factor_eval
        self.min_capacity = config.router_min_capacity
        self.drop_tokens = config.router_drop_tks
        self.router_combine = config.router_combine
        self.router_aux_loss_type = config.router_aux_loss_type
        self.gate_weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        experts_cls = OpenMoeExperts if config.double_gated_mlp else LlamaExperts
        self.experts = experts_cls(config.num_experts, config.hidden_size, config.expert_intermediate_size)
        # Aux-loss-free balancing bias (selection only); None unless the trainer enables it.
        self.selection_bias: torch.Tensor | None = None
        # "bmm": capacity buffer [E, C, H] and batched matmuls (the reference); "grouped": kept tokens sorted by
        # expert and one grouped GEMM per weight, no padding (needs torch._grouped_mm). A kernel switch, not config.
        self.expert_impl = "bmm"

    def route(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> RouterOutput:
        # Training uses the tighter factor (speed); eval the looser one (dropping hurts quality more than it saves).
        cf = self.capacity_factor_train if self.training else self.capacity_factor_eval
        return route(x, self.gate_weight, self.top_k, cf, self.min_capacity, self.drop_tokens, token_mask,
                     self.selection_bias, self.router_combine, size_dropless=self.sizes_dropless_buffer)

    @property
    def sizes_dropless_buffer(self) -> bool:
        """Only the [E, C, H] bmm path needs the dropless capacity (the max load, read on the host)."""
        return self.expert_impl == "bmm"

    def forward(self, hidden: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, MoeAux]:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])  # [T, H]
        mask = None if token_mask is None else token_mask.reshape(-1)
        r = self.route(x, mask)
        if self.expert_impl == "grouped":
            out = grouped_experts(self.experts, x, r)
        else:
            out = combine(self.experts(dispatch(x, r, self.num_experts)), r, x.shape[0])  # via [E, C, H]
        return out.view(shape), moe_aux(r, self.router_aux_loss_type, shape[:-1])


def moe_aux(r: RouterOutput, aux_loss_type: str = "switch", batch_shape: tuple | None = None) -> MoeAux:
    """batch_shape (B, S) of the routed tokens: needed by the per-sequence ("seq") aux loss."""
    if aux_loss_type == "seq":
        if batch_shape is None or len(batch_shape) != 2:
            raise ValueError(f"router_aux_loss_type 'seq' needs the (batch, seq) shape of the tokens, "
                             f"got {batch_shape}")
        aux = router_aux_loss_seq(r.probs, r.expert_idx, r.token_mask, batch_shape[1])
    else:
        aux = router_aux_loss(r.probs, r.expert_idx, r.token_mask)
    return MoeAux(
        aux_loss=aux,
        z_loss=router_z_loss(r.logits, r.token_mask),
        tokens_per_expert=r.tokens_per_expert.detach(),
        dropped_fraction=r.dropped_fraction.detach(),
    )


def reference_moe_forward(layer: OpenMoeSparseMLP, hidden: torch.Tensor, token_mask: torch.Tensor | None = None):
    """Obviously-correct MoE: for every token and every kept choice, run that expert on that token alone."""
    x = hidden.reshape(-1, hidden.shape[-1])
    r = layer.route(x, None if token_mask is None else token_mask.reshape(-1))
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(layer.top_k):
            if r.keep[t, k]:
                e = int(r.expert_idx[t, k])
                out[t] = out[t] + r.combine_weight[t, k].to(x.dtype) * layer.experts.forward_one(e, x[t : t + 1])[0]
    return out.view(hidden.shape), r
