"""Expert-parallel MoE layer. Shapes: T local tokens, H hidden, E experts, E_l = E / ep local experts,
C capacity, P = ep_size ranks in the EP group.

Built from the single-device `OpenMoeSparseMLP`: the router weight is shared (replicated on every rank), the local
experts are a slice [E_l, ...] of the stacked expert tensors, and routing, dispatch and combine are the single-device
functions. This module owns only what crosses ranks:

  capacity mode (equal splits): dispatch into [E, C, H] -> all-to-all (rank j receives rows of its E_l experts from
    every rank: [P, E_l, C, H]) -> experts on [E_l, P*C, H] -> all-to-all back -> combine. C is computed from the local
    token count, identical on all ranks for equal batch shapes, so no count exchange is needed.
  dropless mode (uneven splits): tokens sorted by expert; one small all-to-all exchanges the per-expert counts
    ([P, E_l] per rank, a device->host sync to read split sizes), then the tokens themselves with uneven splits.
    The received rows are regrouped by local expert and run either as a batched matmul over [E_l, max load, H]
    (expert_impl "bmm", the reference: every expert padded to the busiest one's load) or as one grouped GEMM per
    weight over the N_recv rows with the group offsets on the device (expert_impl "grouped": no padding rows, so no
    FLOPs or memory on them; torch._grouped_mm).

Gradients: an expert's weights see the tokens of all P ranks of its EP group, and the plugin then averages expert
gradients over the MoE data-parallel group only, while dense gradients are averaged over all data-parallel ranks.
To give experts the same global mean, expert gradients are scaled by 1/P (forward values untouched).

Options (capacity mode only; both off by default):
  comm_overlap=N   pipeline dispatch all-to-all, experts and combine all-to-all over N capacity chunks, forward and
                   backward (openmoe/parallel/overlap.py).
  hierarchical     each all-to-all as intra-node gather, inter-node all-to-all among node leaders, intra-node
                   scatter (openmoe/parallel/hierarchical.py).
A layer built dropless (capacity_factor_train <= 0 or drop_tokens False) rejects them. When only the eval forward
is dropless (capacity_factor_eval <= 0) that forward runs the plain flat path: its splits are uneven, which neither
the equal-chunk pipeline nor the gather/scatter scheme handles, and an eval forward has no backward to overlap.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from openmoe.moe import HAS_GROUPED_MM, MoeAux, OpenMoeExperts, OpenMoeSparseMLP, combine, dispatch, moe_aux
from openmoe.parallel.hierarchical import hierarchical_all_to_all, hierarchical_comm, local_world_size_from_env
from openmoe.parallel.overlap import overlapped_experts
from openmoe.router import sort_by_expert


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with autograd: backward sends gradients back along the reversed splits."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out_rows = sum(out_splits) if out_splits is not None else x.shape[0]
        out = x.new_empty((out_rows, *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x, group, out_splits=None, in_splits=None):
    return _AllToAll.apply(x, out_splits, in_splits, group)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class ExpertParallelMoE(nn.Module):
    """Drop-in replacement for `OpenMoeSparseMLP` (same forward signature and returns), experts sharded over
    `ep_group`. State-dict keys stay `gate_weight` and `experts.*`; `experts.*` hold this rank's slice.

    comm_overlap: number of capacity chunks to pipeline all-to-all with expert compute; 0 = off (one all-to-all each
        way). 1 runs the chunked code with a single chunk (nothing to overlap). Capacity mode only.
    hierarchical: two-level all-to-all (gather to node leaders, all-to-all among leaders, scatter); False = flat.
        Capacity mode only; not combined with comm_overlap. An EP group inside one node, or with one rank per node,
        uses the flat all-to-all (the two-level one would be the same exchange with extra hops).
    local_world_size: ranks per node for `hierarchical` (global ranks [k*L, (k+1)*L) are node k); None reads
        LOCAL_WORLD_SIZE. Unused unless hierarchical.
    expert_impl: "bmm" or "grouped" (see the module docstring; "grouped" changes the dropless path only: capacity
        buffers are equal-sized, where a grouped GEMM would do the bmm's work). None: the single-device layer's
        `expert_impl`, which the trainer sets from --use_kernel.
    """

    def __init__(self, layer: OpenMoeSparseMLP, ep_group, grad_scale: float | None = None, comm_overlap: int = 0,
                 hierarchical: bool = False, local_world_size: int | None = None, expert_impl: str | None = None):
        super().__init__()
        _check_options(layer, comm_overlap, hierarchical)
        self.expert_impl = getattr(layer, "expert_impl", "bmm") if expert_impl is None else expert_impl
        if self.expert_impl not in ("bmm", "grouped"):
            raise ValueError(f"expert_impl must be 'bmm' or 'grouped', got {self.expert_impl!r}")
        if self.expert_impl == "grouped" and not HAS_GROUPED_MM:
            raise ValueError(f"expert_impl 'grouped' needs torch._grouped_mm, which torch {torch.__version__} lacks")
        self.ep_group = ep_group
        self.ep_size = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)
        if layer.num_experts % self.ep_size:
            raise ValueError(f"num_experts ({layer.num_experts}) must be divisible by ep_size ({self.ep_size})")
        self.num_experts = layer.num_experts
        self.num_local_experts = layer.num_experts // self.ep_size
        self.top_k = layer.top_k
        self.capacity_factor_train, self.capacity_factor_eval = layer.capacity_factor_train, layer.capacity_factor_eval
        self.min_capacity, self.drop_tokens = layer.min_capacity, layer.drop_tokens
        self.router_combine, self.router_aux_loss_type = layer.router_combine, layer.router_aux_loss_type
        self.selection_bias = layer.selection_bias
        self.gate_weight = layer.gate_weight  # the same Parameter: replicated, a dense (non-MoE) parameter
        # Keep the very Parameter objects and slice their data in place: the optimizer is built before ColossalAI's
        # booster applies the policy, and a new Parameter would silently drop out of it (never updated).
        self.experts = layer.experts
        lo = self.ep_rank * self.num_local_experts
        with torch.no_grad():
            for p in self.experts.parameters():
                p.data = p.data[lo : lo + self.num_local_experts].clone()
        self.grad_scale = 1.0 / self.ep_size if grad_scale is None else grad_scale
        self.comm_overlap = comm_overlap
        self.hier_comm = None
        if hierarchical:  # collective over the EP group: every EP rank builds its layers in the same order
            lws = local_world_size_from_env() if local_world_size is None else local_world_size
            self.hier_comm = hierarchical_comm(ep_group, lws)

    @property
    def expert_slice(self) -> slice:
        lo = self.ep_rank * self.num_local_experts
        return slice(lo, lo + self.num_local_experts)

    route = OpenMoeSparseMLP.route
    sizes_dropless_buffer = False  # the dropless path sizes its buffer from the exchanged counts

    def _run_experts(self, x):  # x [E_l, N, H]
        x = _ScaleGrad.apply(x, 1.0 / self.grad_scale)
        return _ScaleGrad.apply(self.experts(x), self.grad_scale)

    def _run_experts_grouped(self, x, counts):  # x [N, H] sorted by local expert, counts [E_l] (on the device)
        x = _ScaleGrad.apply(x, 1.0 / self.grad_scale)
        return _ScaleGrad.apply(self.experts.forward_grouped(x, counts), self.grad_scale)

    def forward(self, hidden: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, MoeAux]:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])  # [T, H]
        mask = None if token_mask is None else token_mask.reshape(-1)
        r = self.route(x, mask)
        dropless = not (self.drop_tokens and (self.capacity_factor_train if self.training
                                               else self.capacity_factor_eval) > 0)
        out = self._dropless(x, r) if dropless else self._capacity(x, r)
        return out.view(shape), moe_aux(r, self.router_aux_loss_type, shape[:-1])

    def _exchange(self, x):
        """Equal-split all-to-all over the EP group (flat or hierarchical), with autograd."""
        return all_to_all(x, self.ep_group) if self.hier_comm is None else hierarchical_all_to_all(x, self.hier_comm)

    def _capacity(self, x, r):
        p, el, c, h = self.ep_size, self.num_local_experts, r.capacity, x.shape[-1]
        buf = dispatch(x, r, self.num_experts)  # [E, C, H], rows ordered by destination rank
        if self.comm_overlap:
            back = overlapped_experts(buf.view(p, el, c, h), self.experts, self.ep_group, self.comm_overlap,
                                      self.grad_scale).view(self.num_experts, c, h)  # [E, C, H]
            return combine(back, r, x.shape[0])
        recv = self._exchange(buf.view(p * el * c, h))  # [P * E_l * C, H]: from each source rank
        recv = recv.view(p, el, c, h).transpose(0, 1).reshape(el, p * c, h)  # [E_l, P*C, H]
        y = self._run_experts(recv)
        y = y.view(el, p, c, h).transpose(0, 1).reshape(p * el * c, h)
        back = self._exchange(y).view(self.num_experts, c, h)  # [E, C, H]
        return combine(back, r, x.shape[0])

    def _dropless(self, x, r):
        p, el, h, k = self.ep_size, self.num_local_experts, x.shape[-1], self.top_k
        key = torch.where(r.keep, r.expert_idx, self.num_experts).reshape(-1)  # [T*K]; E = not routed (padding)
        order = sort_by_expert(key)  # kept choices grouped by expert (so by destination rank), unrouted last
        send_counts = r.tokens_per_expert  # [E]: dropless, so every choice of a real token is kept (route counted)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.ep_group)  # [P * E_l]: per source, per expert
        recv_matrix = recv_counts.view(p, el)
        counts = recv_matrix.sum(0)  # [E_l]
        # The one host sync of this layer: all-to-all split sizes must be Python ints, and the expert buffer is
        # sized by the largest load. Everything below uses these host numbers as output sizes (no further sync).
        host = torch.cat([send_counts.view(p, el).sum(1), recv_matrix.sum(1), counts.max()[None]]).tolist()
        send_splits, recv_splits, cap = host[:p], host[p:2 * p], max(host[-1], 1)
        n_sent, n_recv = sum(send_splits), sum(recv_splits)
        sent = order[:n_sent]  # [N_sent] flat (token, choice) indices, by expert
        t_sorted = sent // k
        recv = all_to_all(x[t_sorted], self.ep_group, recv_splits, send_splits)  # [N_recv, H], by source then expert
        # regroup by local expert: rows from (source s, expert e) -> expert-major order, padded to the max load
        src_expert = torch.arange(p * el, device=x.device).remainder(el).repeat_interleave(
            recv_counts, output_size=n_recv)
        by_expert = sort_by_expert(src_expert)
        if self.expert_impl == "grouped" and n_recv > 0:  # (a rank that receives nothing runs the 1-row bmm)
            y = self._run_experts_grouped(recv[by_expert], counts)  # [N_recv, H], expert-major, no padding
            y_recv = torch.empty_like(recv).index_copy(0, by_expert, y)  # back to (source, expert) order
        else:
            slot = torch.arange(n_recv, device=x.device) - torch.repeat_interleave(
                counts.cumsum(0) - counts, counts, output_size=n_recv)
            flat = src_expert[by_expert] * cap + slot
            buf = x.new_zeros(el * cap, h).index_copy(0, flat, recv[by_expert])  # [E_l * cap, H], padded
            y = self._run_experts(buf.view(el, cap, h)).view(el * cap, h)
            y_recv = torch.empty_like(recv).index_copy(0, by_expert, y[flat])  # back to (source, expert) order
        y_sent = all_to_all(y_recv, self.ep_group, send_splits, recv_splits)  # [N_sent, H] in our sorted order
        w = r.combine_weight.reshape(-1)[sent].to(y_sent.dtype)
        return x.new_zeros(x.shape[0], h).index_add(0, t_sorted, y_sent * w[:, None])


def _check_options(layer: OpenMoeSparseMLP, comm_overlap: int, hierarchical: bool) -> None:
    if comm_overlap < 0:
        raise ValueError(f"comm_overlap is a number of capacity chunks (0 = off), got {comm_overlap}")
    if comm_overlap and hierarchical:
        raise ValueError("comm_overlap and hierarchical all-to-all cannot be combined yet (the chunked pipeline "
                         "uses one flat async all-to-all per chunk); choose one")
    if not (comm_overlap or hierarchical):
        return
    name = "comm_overlap" if comm_overlap else "hierarchical"
    if not layer.drop_tokens or layer.capacity_factor_train <= 0:
        raise ValueError(f"{name} needs capacity mode (equal all-to-all splits), but the layer is dropless "
                         f"(capacity_factor_train={layer.capacity_factor_train}, drop_tokens={layer.drop_tokens})")
    if comm_overlap and type(layer.experts) is not OpenMoeExperts:
        raise ValueError(f"comm_overlap computes the expert backward by hand for OpenMoeExperts (SwiGLU), got "
                         f"{type(layer.experts).__name__}")
