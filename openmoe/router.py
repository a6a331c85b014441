"""Top-k token-choice router with expert capacity, as OpenMoE was trained (ST-MoE / Switch conventions).

Shapes: T tokens, H hidden, E experts, K top-k, C capacity (token slots per expert).

The router runs in fp32: softmax over E logits in bf16 loses the small probability differences that decide top-k
and the z-loss squares logsumexp, which overflows bf16's precision quickly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class RouterOutput:
    expert_idx: torch.Tensor  # [T, K] long: chosen experts, best first
    combine_weight: torch.Tensor  # [T, K] fp32: weight of each choice per `combine` (0 where dropped/masked)
    slot: torch.Tensor | None  # [T, K] long: position of the token in its expert's buffer (valid where keep);
    #   None in dropless mode with size_dropless=False (those callers group tokens by sorting, not by slot)
    keep: torch.Tensor  # [T, K] bool: choice survives capacity (and token is real)
    capacity: int  # C; in dropless mode the largest per-expert load, or 0 if the caller sizes its own buffers
    logits: torch.Tensor  # [T, E] fp32
    probs: torch.Tensor  # [T, E] fp32
    token_mask: torch.Tensor  # [T] bool: real tokens (padding is never routed)
    tokens_per_expert: torch.Tensor  # [E] long: router choices before dropping (for logging and load balancing)

    @property
    def dropped_fraction(self) -> torch.Tensor:
        chosen = self.token_mask.sum() * self.expert_idx.shape[1]
        return 1.0 - self.keep.sum() / chosen.clamp(min=1)


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> int:
    """OpenMoE/T5X rule: floor(k * cf * T / E), rounded up to even, at least min_capacity.

    T counts token slots (padding included), so every EP rank with the same batch shape computes the same C and the
    all-to-all splits are equal without a collective.
    """
    c = math.floor(top_k * capacity_factor * num_tokens / num_experts)
    c += c % 2
    return max(c, min_capacity)


def combine_weights(probs: torch.Tensor, expert_idx: torch.Tensor, combine: str) -> torch.Tensor:
    """[T, K] weights of the chosen experts' outputs (see route)."""
    # OpenMoE ("prob"): combine weights are the raw softmax probabilities of the chosen experts, NOT renormalised over
    # the top-k: this is what OpenMoE was trained with (T5X/ST-MoE top-2 routing); renormalising changes the function.
    weight = probs.gather(1, expert_idx)  # [T, K]
    if combine == "normalized":
        return weight / weight.sum(dim=-1, keepdim=True)
    if combine == "ones":
        return torch.ones_like(weight)
    if combine != "prob":
        raise ValueError(f"router combine '{combine}' is not supported; accepted: 'prob', 'normalized', 'ones'")
    return weight


def choice_keys(expert_idx: torch.Tensor, token_mask: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[K * T] expert of each choice in priority order (every token's first choice, in token order, then every second
    choice, ...); masked tokens get the key num_experts (no expert)."""
    return torch.where(token_mask[:, None], expert_idx, num_experts).t().reshape(-1)


def count_choices(keys: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] long: choices per expert among `keys` (masked tokens' key num_experts not counted). No host sync."""
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=keys.device)
    return counts.scatter_add_(0, keys, torch.ones_like(keys))[:num_experts]


def sort_by_expert(keys: torch.Tensor) -> torch.Tensor:
    """Stable argsort of expert keys (0 <= key <= config.MAX_EXPERTS: an expert id, or num_experts for "none"). The
    keys are sorted as int16: a GPU radix sort passes over every bit of its key type (in session 8's H200 traces, 22
    kernels per call for int64 keys, 10 for int16); the order is the same."""
    return keys.to(torch.int16).argsort(stable=True)


def assign_slots(expert_idx: torch.Tensor, token_mask: torch.Tensor, num_experts: int):
    """(slot [T, K] of each choice in its expert's buffer, tokens_per_expert [E]): every first choice before any
    second choice, in token order within a rank; masked tokens take no slot (their slot reads 0).

    Slot = the choice's position among its expert's choices in priority order: one stable sort of the [K * T]
    priority-ordered keys, minus the position where that expert's run starts. (A cumulative sum over a one-hot
    [K, T, E] gives the same numbers; CUDA scans that layout along its outer dimension, ~1.5 ms per call for
    OpenMoE-8B's 8,192 tokens x 32 experts against tens of microseconds for the sort.)"""
    t, k = expert_idx.shape
    keys = choice_keys(expert_idx, token_mask, num_experts)  # [K * T]
    counts = count_choices(keys, num_experts)
    order = sort_by_expert(keys)
    starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # [E + 1]: where each expert's run begins
    pos = torch.arange(k * t, device=keys.device) - starts[keys[order]]
    slot = torch.empty_like(pos).scatter_(0, order, pos).view(k, t).t()  # [T, K]
    return slot.masked_fill(~token_mask[:, None], 0), counts


def select_experts(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int,
                   selection_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The router's choice: fp32 logits [T, E] (fp32: see the module docstring),
    softmax probabilities [T, E], and the top-k expert ids [T, K] of the probabilities plus the selection bias."""
    logits = F.linear(x.float(), gate_weight.float())  # [T, E]
    probs = logits.softmax(dim=-1)
    scores = probs if selection_bias is None else probs + selection_bias.float()
    _, expert_idx = scores.topk(top_k, dim=-1)  # [T, K]
    return logits, probs, expert_idx


def route(
    x: torch.Tensor,  # [T, H]
    gate_weight: torch.Tensor,  # [E, H]
    top_k: int,
    capacity_factor: float,
    min_capacity: int,
    drop_tokens: bool = True,
    token_mask: torch.Tensor | None = None,  # [T] bool
    selection_bias: torch.Tensor | None = None,  # [E]: added to scores for *selection* only (bias balancing)
    combine: str = "prob",  # "prob" | "normalized" | "ones" (config.ROUTER_COMBINE)
    size_dropless: bool = True,  # False: capacity 0, slot None in dropless mode (no host sync; grouped GEMM, EP paths)
) -> RouterOutput:
    """Choose top-k experts per token and assign buffer slots.

    Priority: every token's first choice is placed before any second choice, and within one choice rank tokens are
    placed in token order (T5X's "tokens choose" with batch-prioritised ranks). A choice whose slot is >= C is dropped:
    that expert contributes nothing for the token and the residual connection carries it.
    Dropless (capacity_factor <= 0 or drop_tokens False): C becomes the largest per-expert load, which costs a
    device->host sync to read it.
    Combine weights: "prob" the raw softmax probability of each choice (OpenMoE); "normalized" the top-k
    probabilities divided by their sum *before* capacity dropping (Mixtral; a dropped choice then loses its share,
    as in Switch); "ones" 1 for every kept choice (MoEfication). With "ones", or "normalized" at top_k 1, no gradient
    reaches the router through the output: it learns from its aux/z losses (or is trained apart, as moefy does).
    """
    num_tokens, num_experts = x.shape[0], gate_weight.shape[0]
    if token_mask is None:
        token_mask = torch.ones(num_tokens, dtype=torch.bool, device=x.device)
    logits, probs, expert_idx = select_experts(x, gate_weight, top_k, selection_bias)
    weight = combine_weights(probs, expert_idx, combine)  # [T, K]
    keep = token_mask[:, None].expand(-1, top_k)
    if (drop_tokens and capacity_factor > 0) or size_dropless:
        slot, tokens_per_expert = assign_slots(expert_idx, token_mask, num_experts)  # [T, K], [E]
    else:  # dropless, the caller sizes its own buffers: nothing reads slots
        slot, tokens_per_expert = None, count_choices(choice_keys(expert_idx, token_mask, num_experts), num_experts)
    if drop_tokens and capacity_factor > 0:
        cap = capacity(num_tokens, num_experts, top_k, capacity_factor, min_capacity)
        keep = keep & (slot < cap)
    elif size_dropless:
        cap = max(int(tokens_per_expert.max().item()), 1)  # host sync: dropless buffers are sized by the max load
    else:
        cap = 0
    return RouterOutput(
        expert_idx=expert_idx,
        combine_weight=weight * keep,
        slot=slot,
        keep=keep,
        capacity=cap,
        logits=logits,
        probs=probs,
        token_mask=token_mask,
        tokens_per_expert=tokens_per_expert,
    )
