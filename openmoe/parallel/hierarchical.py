"""Two-level (hierarchical) all-to-all for expert parallelism across nodes (`hierarchical=True`).
Shapes: P ranks in the EP group = M nodes x L EP ranks per node, n elements in one rank-to-rank block.

A flat all-to-all over P ranks sends P*(P-1) small messages, most of them across the slow inter-node network. Here
each node's ranks send their whole buffer to the node leader (its first rank), the M leaders exchange one large
block per node pair, and each leader hands every local rank what it received for it:

  1. intra-node gather:    leader <- L x [P, n]                    -> [L(src local), M(dst node), L(dst local), n]
  2. inter-node a2a:       leaders exchange [M, L(src local), L(dst local), n] (block m goes to node m)
  3. intra-node scatter:   leader -> each local rank its [M(src node), L(src local), n] = [P(src rank), n]

The result is exactly the flat all-to-all (equal splits only), and, as for the flat one, its adjoint is itself: the
backward is the same hierarchical all-to-all on the gradient.

Nodes: global ranks [k*L_node, (k+1)*L_node) form node k, L_node = LOCAL_WORLD_SIZE (or an explicit argument).
The EP group's ranks must fall into nodes in equal, contiguous runs (true for groups built from sorted rank lists).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


class HierarchicalAllToAll:
    """Equal-split all-to-all over `ep_group` done as gather / inter-node all-to-all / scatter.

    Builds its sub-groups with `new_group(..., use_local_synchronization=True)`: only the members of each sub-group
    call it, so ranks outside this EP group (another pipeline stage, which may hold no MoE layer at all) need not
    take part. Every member creates its groups in the same order (own node's group, then the leaders' group).
    Use `hierarchical_comm` to get one shared instance per (EP group, node size): new_group is collective and every
    group costs communicator memory, so MoE layers must not build their own.
    """

    def __init__(self, ep_group, local_world_size: int):
        ranks = dist.get_process_group_ranks(ep_group)  # global ranks in EP-rank order
        nodes = _split_into_nodes(ranks, local_world_size)
        self.ep_size = len(ranks)
        self.num_nodes, self.local_size = len(nodes), len(nodes[0])  # M, L
        ep_rank = dist.get_rank(ep_group)
        self.node, self.local_rank = divmod(ep_rank, self.local_size)
        self.intra_group = dist.new_group(nodes[self.node], use_local_synchronization=True)
        self.is_leader = self.local_rank == 0
        self.leader_group = (dist.new_group([node[0] for node in nodes], use_local_synchronization=True)
                             if self.is_leader else None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [P*R, ...]: rows [j*R, (j+1)*R) go to EP rank j. Returns [P*R, ...]: rows [j*R, (j+1)*R) came from
        EP rank j (what dist.all_to_all_single(out, x, group=ep_group) returns)."""
        p, m, l = self.ep_size, self.num_nodes, self.local_size
        if x.shape[0] % p:
            raise ValueError(f"hierarchical all-to-all needs equal splits: {x.shape[0]} rows over {p} ranks")
        send = x.contiguous().view(p, -1)  # [P, n]
        out = torch.empty_like(send)
        if not self.is_leader:
            dist.gather(send, group=self.intra_group, group_dst=0)
            dist.scatter(out, group=self.intra_group, group_src=0)
            return out.view_as(x)
        gathered = send.new_empty(l, p, send.shape[1])  # [L(src local), P(dst), n]
        dist.gather(send, gather_list=list(gathered.unbind(0)), group=self.intra_group, group_dst=0)
        by_node = gathered.view(l, m, l, -1).transpose(0, 1).contiguous()  # [M(dst node), L(src lo), L(dst lo), n]
        recv = torch.empty_like(by_node)  # [M(src node), L(src local), L(dst local), n]
        dist.all_to_all_single(recv, by_node, group=self.leader_group)
        per_rank = recv.permute(2, 0, 1, 3).contiguous()  # [L(dst local), M(src node), L(src local), n]
        dist.scatter(out, scatter_list=list(per_rank.view(l, p, -1).unbind(0)), group=self.intra_group, group_src=0)
        return out.view_as(x)


def _split_into_nodes(ranks: list[int], local_world_size: int) -> list[list[int]]:
    if local_world_size < 1:
        raise ValueError(f"local_world_size must be >= 1, got {local_world_size}")
    nodes: list[list[int]] = []
    for r in ranks:
        if nodes and nodes[-1][0] // local_world_size == r // local_world_size:
            nodes[-1].append(r)
        else:
            nodes.append([r])
    if len({n[0] // local_world_size for n in nodes}) != len(nodes) or len({len(n) for n in nodes}) != 1:
        raise ValueError(f"hierarchical all-to-all needs the EP group's ranks {ranks} to fill nodes of "
                         f"local_world_size={local_world_size} in equal contiguous runs; got {nodes}")
    return nodes


def local_world_size_from_env() -> int:
    value = os.environ.get("LOCAL_WORLD_SIZE")
    if value is None:
        raise ValueError("hierarchical all-to-all needs the ranks per node: pass local_world_size or launch with "
                         "torchrun/colossalai run (which set LOCAL_WORLD_SIZE)")
    return int(value)


# One instance per (EP group, node size), shared by every MoE layer of this process: the groups are communicators
# (costly, built collectively), not model state; results never depend on this cache.
_COMMS: dict[tuple[object, int], HierarchicalAllToAll | None] = {}


def hierarchical_comm(ep_group, local_world_size: int) -> HierarchicalAllToAll | None:
    """The shared HierarchicalAllToAll for `ep_group`, or None when the EP group lies within one node or has one rank
    per node: the two-level scheme then degenerates to the flat all-to-all, which is what the caller should use."""
    key = (ep_group, local_world_size)
    if key not in _COMMS:
        nodes = _split_into_nodes(dist.get_process_group_ranks(ep_group), local_world_size)
        _COMMS[key] = HierarchicalAllToAll(ep_group, local_world_size) if len(nodes) > 1 and len(nodes[0]) > 1 else None
    return _COMMS[key]


class _HierarchicalAllToAllFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return comm(x)

    @staticmethod
    def backward(ctx, grad):
        return _HierarchicalAllToAllFn.apply(grad, ctx.comm), None


def hierarchical_all_to_all(x: torch.Tensor, comm: HierarchicalAllToAll) -> torch.Tensor:
    """Autograd-aware `comm(x)`; equal splits."""
    return _HierarchicalAllToAllFn.apply(x, comm)
