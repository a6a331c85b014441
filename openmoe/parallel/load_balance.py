"""Expert load balancing. Shapes: E experts, P EP ranks, E_l = E / P slots per rank.

Two mechanisms:
  * placement rebalancing (`plan_swaps`): decide which experts trade places between EP ranks so that the busiest rank
    gets fewer tokens. Pure planning on token counts; moving the weights is the caller's job.
  * auxiliary-loss-free bias balancing (`BiasBalancer`, DeepSeek-V3 sec. 2.1.2): a per-expert bias added to the routing
    scores for expert *selection* only (combine weights stay the raw probabilities), nudged after every step by
    -rate * sign(load_e - mean load). It changes no gradient and needs no extra loss term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
