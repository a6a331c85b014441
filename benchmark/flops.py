"""Model FLOP accounting for the training benchmarks (pure torch: no colossalai, no GPU).

    flops_per_token = 6 * N_activated + 6 * L * S * A                     (forward + backward, per token)

N_activated, counted from the parameters of the built single-device model (before any parallel wrapping):
    every dense matmul weight (attention q/k/v/o, dense and extra MLPs, router gates, the LM head)
    + top_k / E of the expert weights (each token passes through top_k of the E experts).
  Excluded: the input embedding (a table lookup, no matmul) and 1-D weights (norm scales: elementwise).
  6 = 2 FLOPs per multiply-add x 3 matmuls per weight (forward; backward to the input; backward to the weight).
Attention scores (not parameters): per layer and token, Q K^T and P V each take 2 * S * A FLOPs forward over S keys,
  where A = heads * head_dim is the attention width (3072 for OpenMoE-8B, whose hidden size is 2048): 4 * S * A
  forward, 12 * S * A forward + backward. Causal masking halves the mean number of keys (S/2): 6 * S * A per layer
  and token, 6 * L * S * A for L layers.
These are model FLOPs, i.e. useful work only: the capacity padding of the bmm expert path (E * C >= top_k * T rows),
dropped tokens, recomputation (chunked LM head, activation checkpointing), elementwise ops, the dense [T, E, C]
dispatch einsums of the naive baseline, and a kernel that computes the masked half of causal attention are not
counted. Every configuration is counted the same way from its own model, so MFU compares architectures fairly while
tokens/s compares equal token counts.

MFU = model FLOP/s achieved per GPU / 989e12 (H100/H200 SXM dense bf16 peak, without sparsity).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.nn as nn

HOPPER_BF16_PEAK_FLOPS = 989e12  # H100 / H200 SXM, dense bf16 tensor-core peak


@dataclass(frozen=True)
class FlopCount:
    dense_params: int  # matmul weights every token passes through
    expert_params: int  # all experts of all MoE layers
    embedding_params: int  # not counted
    vector_params: int  # 1-D weights (norm scales): not counted
    top_k: int
    num_experts: int
    num_layers: int  # layers with attention
    attention_width: int  # heads * head_dim
    seq_len: int

    @property
    def activated_params(self) -> int:
        if self.expert_params % self.num_experts:
            raise ValueError(f"expert parameters ({self.expert_params}) are not a multiple of num_experts "
                             f"({self.num_experts}): the expert/dense split by name is wrong")
        return self.dense_params + self.expert_params // self.num_experts * self.top_k

    @property
    def attention_flops_per_token(self) -> int:
        return 6 * self.num_layers * self.seq_len * self.attention_width

    @property
    def flops_per_token(self) -> int:
        return 6 * self.activated_params + self.attention_flops_per_token

    def to_dict(self) -> dict:
        return {**asdict(self), "activated_params": self.activated_params,
                "attention_flops_per_token": self.attention_flops_per_token, "flops_per_token": self.flops_per_token}


def is_expert(name: str) -> bool:
    """OpenMoE `...mlp.experts.wi_gate`, the naive baseline's `...mlp.experts.3.wi_gate`, Mixtral's
    `...block_sparse_moe.experts.3.w1.weight`; not `shared_experts` (dense, every token)."""
    return ".experts." in name


def count_params(model: nn.Module, *, top_k: int, num_experts: int, num_layers: int, attention_width: int,
                 seq_len: int) -> FlopCount:
    dense = expert = embedding = vector = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if name.endswith("embed_tokens.weight"):
            embedding += n
        elif p.dim() < 2:
            vector += n
        elif is_expert(name):
            expert += n
        else:
            dense += n
    return FlopCount(dense, expert, embedding, vector, top_k, num_experts, num_layers, attention_width, seq_len)


def openmoe_flops(model: nn.Module, seq_len: int) -> FlopCount:
    """OpenMoeForCausalLM (or the naive baseline built from it); `model.config` is an OpenMoeConfig."""
    c = model.config
    return count_params(model, top_k=c.router_topk, num_experts=c.num_experts, num_layers=c.num_hidden_layers,
                        attention_width=c.num_attention_heads * c.head_dim, seq_len=seq_len)


def mixtral_flops(model: nn.Module, seq_len: int) -> FlopCount:
    """transformers' MixtralForCausalLM."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return count_params(model, top_k=c.num_experts_per_tok, num_experts=c.num_local_experts,
                        num_layers=c.num_hidden_layers, attention_width=c.num_attention_heads * head_dim,
                        seq_len=seq_len)


def mfu(model_flops_per_s_per_gpu: float, peak: float = HOPPER_BF16_PEAK_FLOPS) -> float:
    return model_flops_per_s_per_gpu / peak
