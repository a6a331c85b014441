"""OpenMoE decoder for one device. Shapes: B batch, S new tokens, P past (cached) tokens, L = P + S keys,
H hidden, N heads, N_kv key/value heads, D head_dim, V vocabulary.

model_family "openmoe" (the default) is faithful to the T5X/flaxformer model that OpenMoE was trained with:
  * RMSNorm everywhere; no biases; untied lm_head; no GQA.
  * attention logits are NOT scaled by 1/sqrt(D) (T5 convention: the scale is folded into the query init).
  * T5X rotary embedding over the full head_dim (rotate-half form, timescales 1..rope_theta).
  * dense MLP: down(swiglu(gate(x)) * up(x)) with a 2I-wide gate projection ("double-gated").
  * MoE layers (every moe_layer_interval-th) run the sparse MLP and then an extra dense MLP with its own pre-norm,
    each with its own residual: h += attn(n(h)); h += moe(n(h)); h += extra_mlp(n(h)).
  * BOS is <pad> (id 0) and is always attendable (see `_attention_allowed`).
model_family "llama_moe" runs the same modules with HF LLaMA's conventions (config.py's table): logits scaled by
1/sqrt(D), grouped KV heads, 3-matrix SwiGLU, no extra MLP, no <pad>-BOS exception. Either family may add shared
experts on MoE layers (`num_shared_experts`): h += moe(n(h)) + shared_experts(n(h)), one pre-norm for both.
Parallelism is applied from outside (openmoe/parallel): nothing here imports colossalai or torch.distributed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from openmoe.config import ModelOptions, OpenMoeConfig
from openmoe.losses import fused_lm_loss, lm_loss
from openmoe.moe import HAS_GROUPED_MM, MoeAux, OpenMoeSparseMLP, swiglu

KVCache = list  # per layer: (k [B, N, L, D], v [B, N, L, D])


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        # apex's fused_rms_norm_affine(x, weight, normalized_shape, eps) when ModelOptions.fused_rmsnorm is on (set by
        # OpenMoeForCausalLM.apply_options only); None = the reference below
        self.fused = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x, self.weight, self.weight.shape, self.eps)
        # variance in fp32 (T5 layer norm does the same); the product is returned in the input dtype
        var = x.float().square().mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """T5X `generate_fixed_pos_embedding`: timescale_i = theta^(2i/D); returns cos, sin [B, S, D] for given positions.

    The same numbers as HF's LlamaRotaryEmbedding with rope_scaling None (inv_freq = 1 / theta^(2i/D) over
    i < D/2, angles concatenated twice, fp32, then cast), and `apply_rope` is its rotate-half convention."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    angles = position_ids.float()[..., None] * inv_freq  # [B, S, D/2]
    angles = torch.cat([angles, angles], dim=-1)  # [B, S, D]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, N_kv, L, D] -> [B, N_kv * n_rep, L, D]: query head h uses KV head h // n_rep (HF LLaMA's repeat_kv)."""
    if n_rep == 1:
        return x
    b, n_kv, length, d = x.shape
    return x[:, :, None].expand(b, n_kv, n_rep, length, d).reshape(b, n_kv * n_rep, length, d)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, N, S, D]; cos/sin [B, S, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class OpenMoeAttention(nn.Module):
    def __init__(self, config: OpenMoeConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.num_kv_heads = config.num_key_value_heads
        self.scale = config.attention_scale  # 1.0 for OpenMoE (T5 convention), 1/sqrt(D) for llama_moe
        inner, kv_inner = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_inner, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_inner, bias=False)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=False)
        self.attn_impl = "sdpa"  # ModelOptions.attn_impl, set by OpenMoeForCausalLM.apply_options only

    def forward(self, x, cos, sin, allowed, past_kv=None):
        """x [B, S, H]; allowed: [B, 1, S, L] bool or None (= plain causal, no cache, no padding).
        Returns (out [B, S, H], (k, v) [B, N_kv, L, D]): the cache holds the N_kv heads, not their repeats."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # [B, N, S, D]
        k, v = (proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, N_kv, S, D]
                for proj in (self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)  # [B, N_kv, L, D]
            v = torch.cat([past_kv[1], v], dim=2)
        n_rep = self.num_heads // self.num_kv_heads
        k_all, v_all = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # [B, N, L, D]
        if self.attn_impl == "eager":
            scores = torch.matmul(q.float(), k_all.float().transpose(2, 3))
            if self.scale != 1.0:  # OpenMoE: no 1/sqrt(D) (T5 convention); llama_moe: HF's scaling
                scores = scores * self.scale
            if allowed is None:
                allowed = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()[None, None]
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
            out = torch.matmul(probs.to(v_all.dtype), v_all)
        else:
            out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=allowed, is_causal=allowed is None,
                                                 scale=self.scale)
        out = out.transpose(1, 2).reshape(b, s, -1)  # [B, S, N*D]
        return self.o_proj(out), (k, v)


class OpenMoeMLP(nn.Module):
    """Dense gated MLP down(act(gate(x)) * up(x)) of width I (default config.intermediate_size).
    OpenMoE: gate [2I, H] and act = swiglu (double-gated); llama_moe: gate [I, H] and act = silu (HF LlamaMLP)."""

    def __init__(self, config: OpenMoeConfig, intermediate_size: int | None = None):
        super().__init__()
        i = config.intermediate_size if intermediate_size is None else intermediate_size
        self.act = swiglu if config.double_gated_mlp else F.silu
        self.gate_proj = nn.Linear(config.hidden_size, (2 if config.double_gated_mlp else 1) * i, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, i, bias=False)
        self.down_proj = nn.Linear(i, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class OpenMoeDecoderLayer(nn.Module):
    def __init__(self, config: OpenMoeConfig, layer_idx: int):
        super().__init__()
        self.is_moe = config.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = OpenMoeAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.has_shared = self.is_moe and config.num_shared_experts > 0
        self.has_extra = self.is_moe and config.extra_mlp
        if self.is_moe:
            self.mlp = OpenMoeSparseMLP(config)
        else:
            self.mlp = OpenMoeMLP(config)
        if self.has_shared:  # a sibling of `mlp`, so the expert-parallel swap of `mlp` leaves it dense
            width = config.num_shared_experts * config.expert_intermediate_size
            self.shared_experts = OpenMoeMLP(config, width)
        if self.has_extra:
            self.pre_extra_mlp_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.extra_mlp = OpenMoeMLP(config)

    def forward(self, h, cos, sin, allowed, token_mask, past_kv=None):
        """Returns (h [B, S, H], (k, v), MoeAux or None)."""
        with torch.profiler.record_function("openmoe.attention"):  # a named range in profiles, nothing otherwise
            a, kv = self.self_attn(self.input_layernorm(h), cos, sin, allowed, past_kv)
        h = h + a
        aux = None
        if self.is_moe:
            n = self.post_attention_layernorm(h)
            with torch.profiler.record_function("openmoe.moe"):
                m, aux = self.mlp(n, token_mask)
            if self.has_shared:
                m = m + self.shared_experts(n)
            h = h + m
            if self.has_extra:
                h = h + self.extra_mlp(self.pre_extra_mlp_layernorm(h))
        else:
            h = h + self.mlp(self.post_attention_layernorm(h))
        return h, kv, aux


@dataclass
class OpenMoeOutput:
    """Loss parts are the weighted terms that add up to `loss` (each is 0 when its factor is 0)."""

    loss: torch.Tensor | None = None
    ce_loss: torch.Tensor | None = None  # label-smoothed cross-entropy, mean over valid tokens
    z_loss: torch.Tensor | None = None  # z_loss_factor * mean logsumexp(logits)^2
    aux_loss: torch.Tensor | None = None  # router_aux_loss_factor * mean over MoE layers
    router_z_loss: torch.Tensor | None = None  # router_z_loss_factor * mean over MoE layers
    num_tokens: torch.Tensor | None = None  # valid (label != -100) tokens
    logits: torch.Tensor | None = None  # [B, S, V] fp32 (only when asked for or without labels)
    past_key_values: KVCache | None = None
    moe: list[MoeAux] = field(default_factory=list)  # per MoE layer, in layer order


class OpenMoeModel(nn.Module):
    def __init__(self, config: OpenMoeConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(OpenMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.options = ModelOptions()  # the OpenMoeForCausalLM's, set by its apply_options

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        b, s = input_ids.shape
        past = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        position_ids, allowed, token_mask = self.layer_inputs(input_ids, attention_mask, position_ids, past)
        h = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, h.dtype)
        h, moe, cache = self.run_layers(h, cos, sin, allowed, token_mask, range(len(self.layers)), past_key_values,
                                        use_cache)
        return self.norm(h), cache, moe

    def layer_inputs(self, input_ids, attention_mask, position_ids, past: int):
        """(position_ids [B, S], allowed [B, 1, S, L] | None, token_mask [B, S] | None) for the decoder layers;
        the pipeline stages build theirs here too."""
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = default_positions(attention_mask, b, s, past, input_ids.device)
        allowed = _attention_allowed(attention_mask, s, past, input_ids.device, self.config.pad_is_bos)
        token_mask = None if attention_mask is None else attention_mask[:, past:].bool()
        return position_ids, allowed, token_mask

    def run_layers(self, h, cos, sin, allowed, token_mask, layers: range, past_key_values=None, use_cache=False):
        """The decoder-layer loop, shared by `forward` and the pipeline stages (which run a sub-range).
        Returns (h [B, S, H], MoeAux per MoE layer in order, KV cache or None)."""
        recompute = self.options.activation_checkpointing and self.training and torch.is_grad_enabled()
        ac_kwargs = _checkpoint_kwargs(self.options.ac_policy) if recompute else {}
        cache, moe = [], []
        for i in layers:
            layer = self.layers[i]
            layer_past = None if past_key_values is None else past_key_values[i]
            if recompute:
                h, kv, aux = checkpoint(layer, h, cos, sin, allowed, token_mask, use_reentrant=False, **ac_kwargs)
            else:
                h, kv, aux = layer(h, cos, sin, allowed, token_mask, layer_past)
            if use_cache:
                cache.append(kv)
            if aux is not None:
                moe.append(aux)
        return h, moe, (cache if use_cache else None)


def _saved_ops() -> set:
    names = ("mm", "bmm", "addmm", "_grouped_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu")
    return {getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n)}


def _selective_policy(ctx, func, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if func in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_SAVED_OPS = _saved_ops()


def _checkpoint_kwargs(policy: str) -> dict:
    """"full": keep only each layer's input and recompute everything; "selective": also keep the outputs of the
    matmuls and attention kernels (the FLOPs), recompute only the cheap elementwise ops (norms, RoPE, SwiGLU,
    routing). Collectives (the EP all-to-all) are not saved: they run again in the recompute either way."""
    if policy == "full":
        return {}
    assert policy == "selective", policy  # ModelOptions validated it
    return dict(context_fn=lambda: create_selective_checkpoint_contexts(_selective_policy))


def fused_rmsnorm_kernel():
    """apex's fused_rms_norm_affine, or one clear error (the run config validation calls this up front too)."""
    try:
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine
    except ImportError as e:
        raise ValueError(f"fused_rmsnorm (--use_layernorm_kernel) needs NVIDIA apex with its fused layer-norm "
                         f"extension (apex.normalization.fused_layer_norm), which cannot be imported ({e}); install "
                         f"apex or drop --use_layernorm_kernel") from None
    return fused_rms_norm_affine


def default_positions(attention_mask, b, s, past, device):
    """Positions count real tokens only, so a left-padded row gets the same positions as it would unpadded."""
    if attention_mask is None:
        return torch.arange(past, past + s, device=device).expand(b, s)
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, past:]


def _attention_allowed(attention_mask, s, past, device, pad_is_bos: bool = True):
    """[B, 1, S, L] bool (True = may attend) or None for plain causal attention.

    attention_mask [B, L] marks real tokens (1) and padding (0). OpenMoE's BOS is <pad>, so a mask computed as
    `input_ids != pad_id` would hide it; as in the original model (pad_is_bos, the openmoe family), a row that starts
    at column 0 with content from column 1 on keeps column 0 (its BOS) attendable. Each query may always attend to
    itself so that padding rows never become all -inf (their outputs are ignored).
    """
    if attention_mask is None and past == 0:
        return None
    length = past + s
    q_pos = torch.arange(past, length, device=device)[:, None]
    k_pos = torch.arange(length, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]  # [1, 1, S, L]
    if attention_mask is not None:
        keys = attention_mask.bool().clone()
        if pad_is_bos:
            bos_hidden = ~keys[:, 0] & keys[:, 1] if keys.shape[1] > 1 else torch.zeros_like(keys[:, 0])
            keys[:, 0] |= bos_hidden
        allowed = allowed & keys[:, None, None, :]
        allowed = allowed | (k_pos == q_pos)[None, None]
    return allowed  # broadcastable to [B, 1, S, L]


class OpenMoeForCausalLM(nn.Module):
    def __init__(self, config: OpenMoeConfig, options: ModelOptions | None = None, init: bool = True):
        super().__init__()
        self.config = config
        self.model = OpenMoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.options = ModelOptions()
        if init:
            self.reset_parameters()
        self.apply_options(options or ModelOptions())

    def apply_options(self, options: ModelOptions) -> "OpenMoeForCausalLM":
        """Switch kernels and memory trade-offs (config.ModelOptions) on this model: the one place that sets them on
        the submodules. Call before any expert-parallel wrapping (the EP layer copies the MoE layer's settings when
        it is built); a wrapped model is refused. Applying the defaults restores every reference path."""
        if not isinstance(options, ModelOptions):
            raise TypeError(f"options must be an openmoe.config.ModelOptions, got {type(options).__name__}")
        wrapped = [i for i, layer in enumerate(self.model.layers)
                   if layer.is_moe and not isinstance(layer.mlp, OpenMoeSparseMLP)]
        if wrapped:
            raise ValueError(f"apply_options must run before expert-parallel wrapping: MoE layer(s) {wrapped} are "
                             f"{type(self.model.layers[wrapped[0]].mlp).__name__}, not OpenMoeSparseMLP")
        if options.expert_impl == "grouped" and not HAS_GROUPED_MM:
            raise ValueError(f"expert_impl 'grouped' (--use_kernel) needs torch._grouped_mm, which torch "
                             f"{torch.__version__} lacks; accepted here: 'bmm'")
        kernel = fused_rmsnorm_kernel() if options.fused_rmsnorm else None
        cfg = self.config
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.fused = kernel
            elif isinstance(m, OpenMoeAttention):
                m.attn_impl = options.attn_impl
            elif isinstance(m, OpenMoeSparseMLP):
                m.expert_impl = options.expert_impl
                m.capacity_factor_train = 0.0 if options.dropless else cfg.router_capacity_factor_train
                m.capacity_factor_eval = 0.0 if options.dropless else cfg.router_capacity_factor_eval
        self.options = self.model.options = options
        return self

    @torch.no_grad()
    def reset_parameters(self):
        """Initialise every parameter (no checkpoint needed to get finite outputs).

        Our choice, stated: N(0, initializer_range) everywhere; queries additionally scaled by D^-0.5 when the
        attention logits are unscaled (OpenMoE: T5's convention folds 1/sqrt(D) into the query init); output
        projections (o_proj, down_proj, experts.wo) scaled by (2 * num_layers)^-0.5 as in GPT-2; norms start at 1.
        """
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        q_scaled = self.config.attention_scale == 1.0
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif name.endswith("q_proj.weight") and q_scaled:
                p.normal_(0.0, std / math.sqrt(self.config.head_dim))
            elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.wo")):
                p.normal_(0.0, out_std)
            else:
                p.normal_(0.0, std)

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, past_key_values=None,
                use_cache=False, return_logits=None) -> OpenMoeOutput:
        h, cache, moe = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        out = self.head_and_loss(h, labels, return_logits, moe)
        out.past_key_values = cache
        return out

    def head_and_loss(self, h, labels, return_logits, moe: list[MoeAux]) -> OpenMoeOutput:
        """LM head and loss parts from the final-normed hidden states (the last pipeline stage calls this too)."""
        out = OpenMoeOutput(moe=moe)
        if return_logits or (return_logits is None and labels is None):
            out.logits = self.lm_head(h).float()
        if labels is not None:
            cfg = self.config
            aux, rz = router_losses(moe, cfg.router_aux_loss_factor, cfg.router_z_loss_factor, h)
            impl, chunk = self.options.lm_loss_impl, self.options.lm_head_chunk_size
            with torch.profiler.record_function("openmoe.lm_head_loss"):
                if impl != "chunked" and torch.is_grad_enabled() and chunk:
                    ce_z, ce, z, n = fused_lm_loss(h, self.lm_head.weight, labels, cfg.label_smoothing,
                                                   cfg.z_loss_factor, chunk, impl == "fused_compiled")
                else:
                    ce, z, n = lm_loss(h, self.lm_head.weight, labels, cfg.label_smoothing, cfg.z_loss_factor, chunk)
                    ce_z = ce + z
            out.loss, out.ce_loss, out.z_loss, out.aux_loss, out.router_z_loss, out.num_tokens = (
                ce_z + aux + rz, ce, z, aux, rz, n)
        return out

    # --- HF-format checkpoints and generation live in their own modules ---
    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "OpenMoeForCausalLM":
        from openmoe.io.hf import load_pretrained

        return load_pretrained(path, **kwargs)

    def save_pretrained(self, path: str, **kwargs) -> None:
        from openmoe.io.hf import save_pretrained

        save_pretrained(self, path, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        from openmoe.generation import generate

        return generate(self, input_ids, attention_mask, **kwargs)


def router_losses(moe: list[MoeAux], aux_factor: float, z_factor: float, like: torch.Tensor):
    """Weighted means over MoE layers of the router aux loss and router z-loss."""
    if not moe:
        zero = like.new_zeros((), dtype=torch.float32)
        return zero, zero
    aux = torch.stack([m.aux_loss for m in moe]).mean()
    z = torch.stack([m.z_loss for m in moe]).mean()
    return aux_factor * aux, z_factor * z
