"""Expert load balancing. Shapes: E experts, P EP ranks, E_l = E / P slots per rank.

Two mechanisms:
  * placement rebalancing: `plan_swaps` decides which experts trade places between EP ranks so that the busiest rank
    gets fewer tokens (pure planning on token counts); `ExpertPlacement` records where every expert lives and the
    load counted since the last move; `rebalance` / `move_experts` carry out the moves in training (expert weights,
    ZeRO fp32 masters and optimizer moments, and the router rows that score them).
  * auxiliary-loss-free bias balancing (`BiasBalancer`, DeepSeek-V3 sec. 2.1.2): a per-expert bias added to the routing
    scores for expert *selection* only (combine weights stay the raw probabilities), nudged after every step by
    -rate * sign(load_e - mean load). It changes no gradient and needs no extra loss term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Swap:
    slot_a: int  # physical slot = rank * E_l + local index
    slot_b: int


def rank_loads(loads: list[float], num_ranks: int) -> list[float]:
    """Token count per EP rank for loads given per physical slot (slot s lives on rank s // E_l)."""
    per = len(loads) // num_ranks
    return [sum(loads[r * per:(r + 1) * per]) for r in range(num_ranks)]


def plan_swaps(loads: list[float], num_ranks: int, beam_width: int = 8, max_swaps: int | None = None,
               tolerance: float = 0.05, touch_penalty: float = 0.4, same_local_index: bool = True) -> list[Swap]:
    """Beam search over pairwise swaps that lowers the busiest EP rank's load.

    loads: tokens routed to each physical slot (summed over the data-parallel ranks and recent steps).
    A candidate swap exchanges a slot of the currently busiest rank with a slot of another rank. Each state's cost is
    its max rank load plus `touch_penalty * mean rank load` for every swap beyond the first that touches an already
    touched rank (moves cost communication; upstream ColossalAI used the same kind of penalty). The search stops when
    the best max load is within `tolerance` of the mean or no swap improves it.
    same_local_index: only swap slots with the same local index on both ranks. ZeRO partitions each expert tensor
    identically on every EP rank, so such a swap exchanges the same flat ranges of weights, fp32 masters and moments.
    """
    e = len(loads)
    if e % num_ranks:
        raise ValueError(f"number of slots ({e}) must be divisible by the number of EP ranks ({num_ranks})")
    per = e // num_ranks
    mean = sum(loads) / num_ranks
    max_swaps = e if max_swaps is None else max_swaps

    def cost(order, touched):
        return max(rank_loads([loads[x] for x in order], num_ranks)) + touch_penalty * mean * max(0, touched - 2)

    start = (tuple(range(e)), (), 0)  # (slot -> expert currently there, swaps, touch count)
    beam, best = [start], start
    for _ in range(max_swaps):
        candidates = []
        for order, swaps, touched in beam:
            r_loads = rank_loads([loads[x] for x in order], num_ranks)
            busiest = max(range(num_ranks), key=r_loads.__getitem__)
            seen = {r for s in swaps for r in (s.slot_a // per, s.slot_b // per)}
            for i in range(per):
                a = busiest * per + i
                for other in range(num_ranks):
                    if other == busiest:
                        continue
                    for j in ([i] if same_local_index else range(per)):
                        b = other * per + j
                        if loads[order[a]] <= loads[order[b]]:
                            continue  # moving load towards the busiest rank never helps
                        new = list(order)
                        new[a], new[b] = new[b], new[a]
                        extra = (busiest not in seen) + (other not in seen)
                        candidates.append((tuple(new), swaps + (Swap(a, b),), touched + extra))
        if not candidates:
            break
        candidates.sort(key=lambda c: cost(c[0], c[2]))
        beam = candidates[:beam_width]
        if cost(beam[0][0], beam[0][2]) >= cost(best[0], best[2]) - 1e-9:
            break
        best = beam[0]
        if max(rank_loads([loads[x] for x in best[0]], num_ranks)) <= mean * (1 + tolerance):
            break
    return list(best[1])


def apply_swaps(order: list[int], swaps: list[Swap]) -> list[int]:
    """Slot -> expert mapping after the swaps."""
    order = list(order)
    for s in swaps:
        order[s.slot_a], order[s.slot_b] = order[s.slot_b], order[s.slot_a]
    return order


class BiasBalancer:
    """Per-MoE-layer selection biases, updated from each step's global token counts.

    Attach with `attach(layers)`: each layer's router adds its bias to the scores before top-k. Save/restore with
    state_dict / load_state_dict (the trainer stores it in its checkpoints).
    """

    def __init__(self, num_layers: int, num_experts: int, rate: float = 1e-3):
        self.rate = rate
        self.bias = torch.zeros(num_layers, num_experts)

    def attach(self, layers, device=None) -> None:
        if device is not None:
            self.bias = self.bias.to(device)
        for i, layer in enumerate(layers):
            layer.selection_bias = self.bias[i]  # a view: updates below are seen by the router at once

    @torch.no_grad()
    def update(self, tokens_per_expert: torch.Tensor) -> None:
        """tokens_per_expert [layers, E]: counts summed over all ranks for the step just taken."""
        load = tokens_per_expert.to(self.bias.dtype)
        self.bias -= self.rate * torch.sign(load - load.mean(dim=1, keepdim=True))

    def state_dict(self) -> dict:
        return {"bias": self.bias.clone(), "rate": self.rate}

    def load_state_dict(self, state: dict) -> None:
        if state["bias"].shape != self.bias.shape:
            raise ValueError(f"saved router bias has shape {tuple(state['bias'].shape)}, model needs "
                             f"{tuple(self.bias.shape)}")
        self.bias.copy_(state["bias"])  # in place: attached layers keep their views
        self.rate = state["rate"]


# ---------------------------------------------------------------- placement rebalancing, executed
class ExpertPlacement:
    """Which expert each physical slot holds, per MoE layer, and the load counted since the last rebalance.

    slots [L, E]: slots[l, s] is the expert (its index in the published, *logical* layout) that physical slot s of
    MoE layer l holds; slot s lives on EP rank s // E_l as local expert s % E_l. Starts as the identity.
    counts [L, E]: router choices per physical slot (before capacity dropping), summed over all ranks and over the
    steps since the last rebalance (fp64: exact far beyond fp32's 2^24).

    Labelling (why the EP layer needs no index map): a move permutes the router's rows together with the experts, so
    inside the model gate row s always scores whatever expert slot s holds. Routing, dispatch and combine stay the
    plain code, and the model computes the same function in every placement. The permutation is undone only at the
    edges, where a *logical* layout is what the reader expects: checkpoints' `model/` and HF exports (the published
    key layout, and expert e stays the expert e of the pretrained checkpoint, so runs and analyses compare),
    router_bias.pt, and the logged per-expert counts. The placement itself is saved as `expert_placement.pt`; each
    rank's optimizer file stays physical, like its shards. On resume the logical weights are loaded into the
    identity layout and moved into the saved placement (`apply_placement`).
    """

    def __init__(self, layer_names: list[str], num_experts: int, num_ranks: int):
        if num_experts % num_ranks:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by the number of EP ranks ({num_ranks})")
        self.layer_names = list(layer_names)  # module names of the MoE layers, in forward order (state-dict prefixes)
        self.num_experts, self.num_ranks = num_experts, num_ranks
        self.reset()

    def reset(self) -> None:
        """The identity placement, nothing counted."""
        self.slots = torch.arange(self.num_experts).repeat(len(self.layer_names), 1)  # [L, E]
        self.counts = torch.zeros(len(self.layer_names), self.num_experts, dtype=torch.float64)  # [L, E]

    def record(self, counts: torch.Tensor) -> None:
        """counts [L, E]: one step's router choices per physical slot, already summed over all ranks."""
        self.counts += counts.detach().to("cpu", torch.float64)

    def plan(self) -> list[list[Swap]]:
        """Per layer, the swaps that even out the counted load (same local index on both ranks: see plan_swaps)."""
        return [plan_swaps(c.tolist(), self.num_ranks) for c in self.counts]

    def commit(self, plans: list[list[Swap]]) -> list[list[int]]:
        """Record the moves and start counting afresh. Returns per layer `order`: new slot s holds what old slot
        order[s] held (the argument of move_experts)."""
        orders = [apply_swaps(list(range(self.num_experts)), swaps) for swaps in plans]
        self.slots = torch.stack([row[torch.tensor(order)] for row, order in zip(self.slots, orders)])
        self.counts.zero_()
        return orders

    def to_logical(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """x [E, ...] indexed by physical slot -> indexed by expert."""
        return x[self.slots[layer].argsort().to(x.device)]

    def to_logical_state_dict(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A gathered (physical) state dict -> the published layout: router rows and expert tensors of every MoE
        layer un-permuted; other keys (shared experts included) untouched."""
        out = dict(sd)
        for layer, name in enumerate(self.layer_names):
            for key in sd:
                if key == f"{name}.gate_weight" or key.startswith(f"{name}.experts."):
                    out[key] = self.to_logical(sd[key], layer)
        return out

    def state_dict(self) -> dict:
        return {"slots": self.slots.clone(), "counts": self.counts.clone(), "num_ranks": self.num_ranks}

    def load_state_dict(self, state: dict) -> None:
        if state["slots"].shape != self.slots.shape or state["num_ranks"] != self.num_ranks:
            raise ValueError(f"saved expert placement is for {tuple(state['slots'].shape)} (layers, experts) over "
                             f"{state['num_ranks']} EP ranks; this run has {tuple(self.slots.shape)} over "
                             f"{self.num_ranks}")
        self.slots, self.counts = state["slots"].clone(), state["counts"].to(torch.float64).clone()


@dataclass
class LayerRebalance:
    """What one rebalance did to one MoE layer, for the log: token loads per EP rank (counted since the previous
    rebalance) under the old and the new placement, and the experts that traded places."""

    layer: int
    rank_loads_before: list[float]
    rank_loads_after: list[float]
    swaps: list[tuple[int, int]]  # (expert, expert) in logical ids, in the order they were made

    @staticmethod
    def max_over_mean(loads: list[float]) -> float:
        mean = sum(loads) / len(loads)
        return max(loads) / mean if mean else 1.0

    def describe(self, name: str) -> str:
        moves = ", ".join(f"{a}<->{b}" for a, b in self.swaps) or "none"
        return (f"{name}: EP-rank load max/mean {self.max_over_mean(self.rank_loads_before):.3f} -> "
                f"{self.max_over_mean(self.rank_loads_after):.3f}, experts swapped: {moves}")


def rebalance(layers: list, placement: ExpertPlacement, shard_copies=None) -> list[LayerRebalance]:
    """Plan from the counted load, move experts (weights, fp32 masters, optimizer moments) and router rows to
    match, record the new placement. shard_copies: p -> the optimizer's flat copies of p (openmoe.backend's
    shard_copies(optimizer)), or None without an optimizer. Collective: every rank calls it after the same step (the
    counts are identical everywhere, so is the plan). Call it between optimizer steps (no gradients pending)."""
    plans, counts, before = placement.plan(), placement.counts.tolist(), placement.slots.tolist()
    orders = placement.commit(plans)
    reports = []
    for layer, (module, swaps, order, loads, expert) in enumerate(zip(layers, plans, orders, counts, before)):
        if swaps:
            move_experts(module, order, shard_copies)
        traded = []
        for s in swaps:  # a later swap may move a slot an earlier one filled: name the experts as they go
            traded.append((expert[s.slot_a], expert[s.slot_b]))
            expert[s.slot_a], expert[s.slot_b] = expert[s.slot_b], expert[s.slot_a]
        reports.append(LayerRebalance(layer, rank_loads(loads, placement.num_ranks),
                                      rank_loads([loads[s] for s in order], placement.num_ranks), traded))
    return reports


def apply_placement(layers: list, placement: ExpertPlacement) -> None:
    """Move weights loaded in the identity layout (slot s = expert s) into `placement`: working parameters and
    selection biases only (on resume the optimizer's fp32 masters and moments come from each rank's own file,
    already physical). Collective over every EP group."""
    for module, slots in zip(layers, placement.slots.tolist()):
        if slots != list(range(placement.num_experts)):
            move_experts(module, slots, None)


def exchange_plan(order: list[int], num_ranks: int, ep_rank: int) -> tuple[list[int], list[int]]:
    """For this EP rank's local slots, the EP rank each receives its new contents from (src) and the EP rank each
    sends its current contents to (dst), when new slot s takes old slot order[s]. Only same-local-index moves."""
    per = len(order) // num_ranks
    new_of_old = [0] * len(order)
    for s, o in enumerate(order):
        if o % per != s % per:
            raise ValueError(f"slot {s} would take slot {o}: expert moves must keep the local index (ZeRO shards "
                             f"every EP rank's expert tensors alike); plan with same_local_index=True")
        new_of_old[o] = s
    mine = range(ep_rank * per, (ep_rank + 1) * per)
    return [order[s] // per for s in mine], [new_of_old[s] // per for s in mine]


def slot_ranges(lo: int, length: int, slot_numel: int, num_local: int) -> list[tuple[int, int]]:
    """For a flat piece holding elements [lo, lo + length) of a [E_l * slot_numel] tensor (a ZeRO shard may also
    hold padding past the end): the part of each local slot inside it, as (start, end) offsets into the piece
    (start == end: none of it)."""
    hi = lo + length
    return [(min(max(i * slot_numel, lo), hi) - lo, min(max((i + 1) * slot_numel, lo), hi) - lo)
            for i in range(num_local)]


def move_experts(layer, order: list[int], shard_copies=None) -> None:
    """Permute the slots of one expert-parallel MoE layer: new slot s takes the contents of old slot order[s].

    Experts: every flat copy this rank holds (the bf16/fp16 working tensor; with a ZeRO optimizer its fp32 master
    shard and the moment shards in optimizer.state) is exchanged slot range by slot range in one all-to-all over the
    EP group. All ranks of an EP group have the same MoE-DP rank, so their ZeRO shards cover the same flat range and
    the pieces of a same-local-index move line up; each MoE-DP replica group runs its own exchange.
    Router: gate rows (working tensor, and the fp32 master and moments, which ZeRO shards over the dense
    data-parallel group with boundaries anywhere inside a row: gathered, permuted, re-sliced) and the selection bias
    of --balance_mode bias are permuted in place on every rank.
    """
    ep_group, per = layer.ep_group, layer.num_local_experts
    src, dst = exchange_plan(order, layer.ep_size, layer.ep_rank)
    for p in layer.experts.parameters():
        for piece, lo, _ in _flat_copies(p, shard_copies):
            exchange_slots(piece, lo, p.numel() // per, src, dst, layer.ep_rank, ep_group)
    index = torch.tensor(order)
    for piece, lo, group in _flat_copies(layer.gate_weight, shard_copies):
        _permute_rows(piece, lo, layer.gate_weight.shape, index, group)
    if layer.selection_bias is not None:
        layer.selection_bias.copy_(layer.selection_bias[index.to(layer.selection_bias.device)])


def _flat_copies(p: torch.nn.Parameter, shard_copies) -> list[tuple[torch.Tensor, int, object]]:
    """(flat tensor, offset of its first element in p's flat values, group over which the rest is spread or None)
    for every copy of p's values this rank holds: p itself and the optimizer's (with ZeRO: the fp32 master shard and
    its moments; none without an optimizer, as on resume, where masters come from the files)."""
    copies = [(p.data.view(-1), 0, None)]  # in place: ZeRO's padded all-gather buffer shares this storage
    return copies + (shard_copies(p) if shard_copies is not None else [])


@torch.no_grad()
def exchange_slots(piece, lo, slot_numel, src, dst, ep_rank, group) -> None:
    """One all-to-all: send each local slot's part of `piece` to dst[i], write what src[i] sends into it."""
    ranges = slot_ranges(lo, piece.numel(), slot_numel, len(src))
    size = [b - a for a, b in ranges]
    ranks = range(dist.get_world_size(group))
    sends = [[i for i, r in enumerate(dst) if r == d != ep_rank] for d in ranks]  # slots that stay are not sent
    recvs = [[i for i, r in enumerate(src) if r == q != ep_rank] for q in ranks]
    send = torch.cat([piece[slice(*ranges[i])] for ids in sends for i in ids] + [piece[:0]])
    recv = piece.new_empty(sum(size[i] for ids in recvs for i in ids))
    dist.all_to_all_single(recv, send, [sum(size[i] for i in ids) for ids in recvs],
                           [sum(size[i] for i in ids) for ids in sends], group=group)
    offset = 0
    for i in (i for ids in recvs for i in ids):
        piece[slice(*ranges[i])] = recv[offset:offset + size[i]]
        offset += size[i]


@torch.no_grad()
def _permute_rows(piece, lo, shape, index, group) -> None:
    """Rows of a [E, H] parameter permuted (row s <- row index[s]) in the flat piece [lo, lo + len) it holds."""
    n = shape.numel()
    if group is None:
        full = piece
    else:
        parts = [torch.empty_like(piece) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, piece.contiguous(), group=group)
        full = torch.cat(parts)  # [padded numel]
    rows = full[:n].view(shape)
    rows.copy_(rows[index.to(rows.device)])
    if group is not None:
        piece.copy_(full[lo:lo + piece.numel()])


def check_load_balance(run, sizes) -> None:
    """--load_balance needs experts spread over EP ranks and (for now) no pipeline. One-line errors with values."""
    if not run.balance.load_balance:
        return
    if run.balance.load_balance_interval < 1:
        raise ValueError(f"--load_balance_interval ({run.balance.load_balance_interval}) must be >= 1 (steps between "
                         "rebalances)")
    if sizes.ep < 2:
        raise ValueError(f"--load_balance moves experts between expert-parallel ranks, but ep_size is {sizes.ep}; "
                         "accepted: ep_size >= 2 (--plugin ep on >= 2 ranks, ep_zero with world / extra_dp_size "
                         ">= 2, hybrid --ep_size >= 2)")
    if run.parallel.offload_optimizer:
        raise ValueError("--load_balance moves experts' fp32 masters and Adam moments between GPUs, but "
                         "--offload_optimizer keeps them in host memory; accepted: one of the two")
    if sizes.pp > 1:
        raise ValueError(f"--load_balance is not supported with pipeline parallelism yet (pp_size {sizes.pp}); "
                         "accepted: pp_size 1 (--plugin ep, ep_zero, or hybrid --pp_size 1)")
