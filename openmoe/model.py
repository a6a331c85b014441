"""OpenMoE decoder for one device. Shapes: B batch, S new tokens, P past (cached) tokens, L = P + S keys,
H hidden, N heads, N_kv key/value heads, D head_dim, V vocabulary.

model_family "openmoe" (the default) is faithful to the T5X/flaxformer model that OpenMoE was trained with:
  * RMSNorm everywhere; no biases; untied lm_head; no GQA.
  * attention logits are NOT scaled by 1/sqrt(D) (T5 convention: the scale is folded into the query init).
  * T5X rotary embedding over the full head_dim (rotate-half form, timescales 1..rope_theta).
  * dense MLP: down(swiglu(gate(x)) * up(x)) with a 2I-wide gate projection ("double-gated").
  * MoE layers (every moe_layer_interval-th) run the sparse MLP and then an extra dense MLP with its own pre-norm,
    each with its own residual: h += attn(n(h)); h += moe(n(h)); h += extra_mlp(n(h)).
  * BOS is <pad> (id 0), an ordinary token at absolute position 0, attended and routed even where an attention
    mask built as `input_ids != pad_id` hides it (see `bos_visible_mask`).
model_family "llama_moe" runs the same modules with HF LLaMA's conventions (config.py's table): logits scaled by
1/sqrt(D), grouped KV heads, 3-matrix SwiGLU, no extra MLP, no <pad>-BOS exception. Either family may add shared
experts on MoE layers (`num_shared_experts`): h += moe(n(h)) + shared_experts(n(h)), one pre-norm for both.
Parallelism is applied from outside (openmoe/parallel): nothing here imports colossalai or torch.distributed.

This file and its siblings (config, router, losses, moe) import only torch, transformers and each other: they are
copied into every exported checkpoint, where `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
runs them without the openmoe package. `OpenMoeForCausalLM` is a transformers PreTrainedModel + GenerationMixin:
from_pretrained (torch_dtype, device_map), generate (a transformers DynamicCache as the KV cache), pipelines, PEFT.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.utils import ModelOutput

# every sibling imported here directly: transformers copies only these out of an exported directory
from .config import ModelOptions, OpenMoeConfig
from .losses import fused_lm_loss, lm_loss
from .moe import HAS_GROUPED_MM, MoeAux, OpenMoeSparseMLP, swiglu
from .router import route  # noqa: F401  (see above: router.py must travel with the export)

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
# What generate() calls the KV cache in model inputs and outputs: "past_key_values" (transformers 4) or "cache"
# (transformers 5.2x, which renames the old name in every ModelOutput constructor).
CACHE_NAME = ("cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
              else "past_key_values")


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
    def __init__(self, config: OpenMoeConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx  # its slot in the KV cache
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.num_kv_heads = config.num_key_value_heads
        self.scale = config.attention_scale  # 1.0 for OpenMoE (T5 convention), 1/sqrt(D) for llama_moe
        inner, kv_inner = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_inner, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_inner, bias=False)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=False)
        self.attn_impl = "sdpa"  # ModelOptions.attn_impl, set by OpenMoeForCausalLM.apply_options only

    def forward(self, x, cos, sin, allowed, cache: Cache | None = None):
        """x [B, S, H]; allowed: [B, 1, S, L] bool or None (= plain causal, no cache, no padding); cache: the
        transformers Cache holding [B, N_kv, P, D] keys/values per layer (the N_kv heads, not their repeats),
        extended here by this call's S positions. Returns out [B, S, H]."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # [B, N, S, D]
        k, v = (proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, N_kv, S, D]
                for proj in (self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, N_kv, L, D]
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
        return self.o_proj(out)


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
        self.self_attn = OpenMoeAttention(config, layer_idx)
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

    def forward(self, h, cos, sin, allowed, token_mask, cache: Cache | None = None):
        """Returns (h [B, S, H], MoeAux or None)."""
        with torch.profiler.record_function("openmoe.attention"):  # a named range in profiles, nothing otherwise
            a = self.self_attn(self.input_layernorm(h), cos, sin, allowed, cache)
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
        return h, aux


@dataclass
class OpenMoeOutput(ModelOutput):
    """Loss parts are the weighted terms that add up to `loss` (each is 0 when its factor is 0). A transformers
    ModelOutput: loss, logits and past_key_values come first, as in CausalLMOutputWithPast."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # [B, S or logits_to_keep, V] fp32 (only when asked for or without labels)
    if CACHE_NAME == "cache":  # transformers 5: `past_key_values` stays readable as ModelOutput's alias of `cache`
        cache: Cache | None = None
    else:
        past_key_values: Cache | None = None
    ce_loss: torch.Tensor | None = None  # label-smoothed cross-entropy, mean over valid tokens
    z_loss: torch.Tensor | None = None  # z_loss_factor * mean logsumexp(logits)^2
    aux_loss: torch.Tensor | None = None  # router_aux_loss_factor * mean over MoE layers
    router_z_loss: torch.Tensor | None = None  # router_z_loss_factor * mean over MoE layers
    num_tokens: torch.Tensor | None = None  # valid (label != -100) tokens
    moe: list[MoeAux] | None = None  # per MoE layer, in layer order ([] when there is none)

    def __post_init__(self):
        super().__post_init__()
        if self.moe is None:
            self.moe = []


class OpenMoeModel(nn.Module):
    def __init__(self, config: OpenMoeConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(OpenMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.options = ModelOptions()  # the OpenMoeForCausalLM's, set by its apply_options

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values: Cache | None = None,
                use_cache=False):
        """Returns (final-normed h [B, S, H], the cache or None, MoeAux per MoE layer). With use_cache and no
        past_key_values a DynamicCache is started; a given cache is extended in place."""
        if past_key_values is not None and not isinstance(past_key_values, Cache):
            raise TypeError(f"past_key_values must be a transformers Cache (e.g. DynamicCache), got "
                            f"{type(past_key_values).__name__}")
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = 0 if past_key_values is None else past_key_values.get_seq_length()
        position_ids, allowed, token_mask = self.layer_inputs(input_ids, attention_mask, position_ids, past)
        h = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, h.dtype)
        h, moe = self.run_layers(h, cos, sin, allowed, token_mask, range(len(self.layers)), past_key_values)
        return self.norm(h), (past_key_values if use_cache else None), moe

    def layer_inputs(self, input_ids, attention_mask, position_ids, past: int):
        """(position_ids [B, S], allowed [B, 1, S, L] | None, token_mask [B, S] | None) for the decoder layers;
        the pipeline stages build theirs here too. Without a cache (past 0) the mask is made BOS-visible here; with
        one, attention_mask [B, P + S] must already be (generate's prepare_inputs_for_generation does it)."""
        b, s = input_ids.shape
        if attention_mask is not None and past == 0 and self.config.pad_is_bos:
            attention_mask = bos_visible_mask(input_ids, attention_mask, self.config.bos_token_id)
        if position_ids is None:
            position_ids = default_positions(attention_mask, b, s, past, input_ids.device)
        allowed = _attention_allowed(attention_mask, s, past, input_ids.device)
        token_mask = None if attention_mask is None else attention_mask[:, past:].bool()
        return position_ids, allowed, token_mask

    def run_layers(self, h, cos, sin, allowed, token_mask, layers: range, cache: Cache | None = None):
        """The decoder-layer loop, shared by `forward` and the pipeline stages (which run a sub-range).
        Returns (h [B, S, H], MoeAux per MoE layer in order)."""
        recompute = (self.options.activation_checkpointing and self.training and torch.is_grad_enabled()
                     and cache is None)
        ac_kwargs = _checkpoint_kwargs(self.options.ac_policy) if recompute else {}
        moe = []
        for i in layers:
            layer = self.layers[i]
            if recompute:
                h, aux = checkpoint(layer, h, cos, sin, allowed, token_mask, use_reentrant=False, **ac_kwargs)
            else:
                h, aux = layer(h, cos, sin, allowed, token_mask, cache)
            if aux is not None:
                moe.append(aux)
        return h, moe


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


def bos_visible_mask(input_ids, attention_mask, bos_token_id: int):
    """attention_mask [B, L] with each row's hidden <pad> BOS made visible (input_ids [B, L], no cache).

    OpenMoE's BOS is <pad>, so the mask transformers builds (`input_ids != pad_token_id`, e.g. in generate) hides it.
    Upstream (T5X, and the original PyTorch port) treats it as an ordinary token at absolute position 0, attended
    and routed. The rule: where a row's first visible token is not the BOS id and the column just before it holds
    the BOS id, that column is the row's BOS and becomes visible. Padding further left stays hidden; a mask that
    already shows the BOS (our tokenizer's) is returned unchanged. Fixed-size index math: no host sync.
    """
    mask = attention_mask.bool()
    first = mask.long().argmax(dim=1, keepdim=True)  # [B, 1] first visible column (0 when none)
    before = (first - 1).clamp(min=0)
    hidden_bos = ((first > 0) & mask.any(dim=1, keepdim=True)
                  & (input_ids.gather(1, first) != bos_token_id) & (input_ids.gather(1, before) == bos_token_id))
    mask = mask.scatter(1, before, mask.gather(1, before) | hidden_bos)
    return mask.to(attention_mask.dtype)


def default_positions(attention_mask, b, s, past, device):
    """Positions count visible tokens only, so a left-padded row gets the same positions as it would unpadded
    (the BOS, once visible, is at position 0)."""
    if attention_mask is None:
        return torch.arange(past, past + s, device=device).expand(b, s)
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, past:]


def _attention_allowed(attention_mask, s, past, device):
    """[B, 1, S, L] bool (True = may attend) or None for plain causal attention.

    attention_mask [B, L] marks real tokens (1) and padding (0); for the openmoe family it is BOS-visible already
    (bos_visible_mask). Each query may always attend to itself so that padding rows never become all -inf (their
    outputs are ignored).
    """
    if attention_mask is None and past == 0:
        return None
    length = past + s
    q_pos = torch.arange(past, length, device=device)[:, None]
    k_pos = torch.arange(length, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]  # [1, 1, S, L]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
        allowed = allowed | (k_pos == q_pos)[None, None]
    return allowed  # broadcastable to [B, 1, S, L]


class OpenMoeForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = OpenMoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["OpenMoeDecoderLayer"]  # device_map never splits a decoder layer
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_cache_class = True  # generate() starts a DynamicCache (transformers 4.x asks this)
    _auto_class = "AutoModelForCausalLM"  # transformers' own save_pretrained (export without openmoe) copies code

    def __init__(self, config: OpenMoeConfig, options: ModelOptions | None = None, init: bool = True):
        """options: run-time switches (config.ModelOptions); init False leaves parameters uninitialised (weights
        loaded afterwards, or a meta-device model)."""
        super().__init__(config)
        self.model = OpenMoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.options = ModelOptions()
        if options is None and getattr(config, "_attn_implementation_internal", None) == "eager":
            options = ModelOptions(attn_impl="eager")  # from_pretrained(..., attn_implementation="eager")
        self._skip_init = not init
        self.post_init()  # transformers' init: _init_weights per module
        self._skip_init = False
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

    # --- initialisation (transformers calls _init_weights per module; children before parents) ---
    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Our choice, stated: N(0, initializer_range) everywhere; queries additionally scaled by D^-0.5 when the
        attention logits are unscaled (OpenMoE: T5's convention folds 1/sqrt(D) into the query init); output
        projections (o_proj, down_proj, experts.wo) scaled by (2 * num_layers)^-0.5 as in GPT-2; norms start at 1.
        Each module initialises the parameters it owns; a parameter transformers marks as loaded is left alone."""
        if self._skip_init:
            return
        cfg = self.config
        std = cfg.initializer_range
        out_std = std / math.sqrt(2 * cfg.num_hidden_layers)
        if isinstance(module, RMSNorm):
            _init(module.weight, None)
        elif isinstance(module, nn.Embedding):
            _init(module.weight, std)
        elif isinstance(module, OpenMoeAttention):
            _init(module.q_proj.weight, std / math.sqrt(cfg.head_dim) if cfg.attention_scale == 1.0 else std)
            _init(module.k_proj.weight, std)
            _init(module.v_proj.weight, std)
            _init(module.o_proj.weight, out_std)
        elif isinstance(module, OpenMoeMLP):
            _init(module.gate_proj.weight, std)
            _init(module.up_proj.weight, std)
            _init(module.down_proj.weight, out_std)
        elif isinstance(module, OpenMoeSparseMLP):
            _init(module.gate_weight, std)
            _init(module.experts.wi_gate, std)
            _init(module.experts.wi_up, std)
            _init(module.experts.wo, out_std)
        elif module is self:
            _init(self.lm_head.weight, std)

    def reset_parameters(self) -> None:
        """Initialise every parameter again (as at construction)."""
        for m in self.modules():
            self._init_weights(m)

    # --- transformers plumbing ---
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        """transformers' switch, mapped onto ModelOptions (non-reentrant checkpointing, the current ac_policy)."""
        self.apply_options(self.options.replace(activation_checkpointing=True))

    def gradient_checkpointing_disable(self) -> None:
        self.apply_options(self.options.replace(activation_checkpointing=False))

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.options.activation_checkpointing

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, past_key_values=None,
                use_cache=None, return_logits=None, logits_to_keep: int = 0, cache=None, inputs_embeds=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, **unused) -> OpenMoeOutput:
        """labels [B, S] (position s predicts labels[s + 1]; -100 ignored) -> loss and its parts. Logits [B, S, V]
        fp32 come back without labels or with return_logits; logits_to_keep k > 0 keeps only the last k positions.
        cache is transformers 5's name for past_key_values. return_dict and transformers' per-call extras
        (cache_position, ...) are accepted and ignored."""
        if inputs_embeds is not None or output_attentions or output_hidden_states:
            raise ValueError("OpenMoeForCausalLM takes input_ids only and returns neither attentions nor hidden "
                             "states (inputs_embeds, output_attentions, output_hidden_states are not supported)")
        past_key_values = cache if cache is not None else past_key_values
        h, cache, moe = self.model(input_ids, attention_mask, position_ids, past_key_values, bool(use_cache))
        return self.head_and_loss(h, labels, return_logits, moe, cache, logits_to_keep)

    def head_and_loss(self, h, labels, return_logits, moe: list[MoeAux], cache=None,
                      logits_to_keep: int = 0) -> OpenMoeOutput:
        """LM head and loss parts from the final-normed hidden states (the last pipeline stage calls this too)."""
        logits = loss = ce = z = aux = rz = n = None
        if return_logits or (return_logits is None and labels is None):
            logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h).float()
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
            loss = ce_z + aux + rz
        return OpenMoeOutput(loss=loss, logits=logits, ce_loss=ce, z_loss=z, aux_loss=aux, router_z_loss=rz,
                             num_tokens=n, moe=moe, **{CACHE_NAME: cache})

    # --- generation (transformers' GenerationMixin.generate drives these) ---
    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, use_cache=True,
                                      logits_to_keep=None, cache=None, **unused):
        """input_ids [B, L] is the whole sequence so far: the BOS rule needs it, so the mask is made BOS-visible
        here over all L columns; the model then gets only the positions the cache does not hold yet."""
        past_key_values = cache if cache is not None else past_key_values
        past = 0 if past_key_values is None else past_key_values.get_seq_length()
        if attention_mask is not None and self.config.pad_is_bos and attention_mask.shape[1] == input_ids.shape[1]:
            attention_mask = bos_visible_mask(input_ids, attention_mask, self.config.bos_token_id)
        # synced_gpus: a rank whose rows are done keeps stepping while its input_ids stop growing (last token again)
        new = input_ids[:, past:] if input_ids.shape[1] > past else input_ids[:, -1:]
        inputs = {"input_ids": new, "attention_mask": attention_mask, CACHE_NAME: past_key_values,
                  "use_cache": use_cache}
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs

    def _reorder_cache(self, past_key_values, beam_idx):  # transformers 4.x beam search with a legacy cache
        past_key_values.reorder_cache(beam_idx)
        return past_key_values

    def generate(self, inputs=None, generation_config=None, fast_decode=None, **kwargs):
        """transformers' generate, with the calls it can run exactly sent to the static-cache fast decoder
        (openmoe/fast_decode.py: no host sync per token, torch.compile on CUDA): greedy or sampling with
        temperature / top_k / top_p, repetition_penalty, eos_token_id(s), pad_token_id, max_new_tokens / max_length,
        a suppressed vocabulary tail, a streamer. Beams, logits processors, stopping criteria, stop strings, dict
        outputs, synced GPUs, device maps and expert-parallel layers go to transformers' generate, the reference.
        The fast decoder routes dropless (no capacity drops at prefill); its cache is kept on the model and rebuilt
        when a request does not fit. Same result: [B, S + n] ids, rows padded after their stop.

        fast_decode: None (default: the fast route on a CUDA model; a generation_config's `fast_decode` field
        decides first), False (always transformers' generate: the reference, with the checkpoint's capacity
        routing), True (the fast route wherever the call allows, CPU included), or a dict of FastDecoder settings
        (compile, moe_impl, sync_every), which also means True. An exported copy without the openmoe package always
        runs transformers' generate."""
        if fast_decode is None:
            fast_decode = getattr(generation_config or self.generation_config, "fast_decode", None)
        if fast_decode is None:
            fast_decode = self.device.type == "cuda"
        if fast_decode is not False:
            try:
                from openmoe.inference import fast_generate
            except ImportError:  # an exported checkpoint's code, loaded without the openmoe package
                fast_generate = None
            out = None if fast_generate is None else fast_generate(self, inputs, generation_config, kwargs,
                                                                   fast_decode)
            if out is not None:
                return out
        return super().generate(inputs, generation_config, **kwargs)

    # --- checkpoints ---
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' from_pretrained (torch_dtype, device_map, max_memory, options=ModelOptions(...), config
        overrides as keywords), in the stored dtype unless torch_dtype says otherwise, and strict: a checkpoint
        whose tensors do not match the model is one error naming
        the keys and shapes instead of silently initialised weights (unless output_loading_info or
        ignore_mismatched_sizes asks for transformers' own behaviour)."""
        path = str(pretrained_model_name_or_path)
        looks_local = os.path.isabs(path) or path.startswith(".") or path.count("/") > 1
        if looks_local and not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint directory {path} does not exist")
        if _TRANSFORMERS_MAJOR < 5:  # transformers 5 spells it dtype and loads the stored dtype by default
            kwargs["torch_dtype"] = kwargs.pop("dtype", kwargs.get("torch_dtype", "auto"))
        want_info = kwargs.pop("output_loading_info", False)
        strict = not want_info and not kwargs.get("ignore_mismatched_sizes", False)
        kwargs.setdefault("ignore_mismatched_sizes", True)  # mismatches come back in info, reported below
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                              **kwargs)
        problems = []
        for key, label in (("missing_keys", "missing keys"), ("unexpected_keys", "unexpected keys")):
            if info.get(key):
                problems.append(f"{label} {sorted(info[key])}")
        if info.get("mismatched_keys"):
            names = [k if isinstance(k, str) else k[0] for k in info["mismatched_keys"]]
            stored = _checkpoint_shapes(path, names)
            ours = model.state_dict()
            wrong = sorted(f"{k}: checkpoint {stored.get(k, '?')} vs model {tuple(ours[k].shape)}" for k in names)
            problems.append(f"wrong shapes [{'; '.join(wrong)}]")
        if strict and problems:
            raise ValueError(f"checkpoint {path} does not match the model: " + "; ".join(problems))
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, **kwargs):
        """With the openmoe package: its atomic writer (io/hf.py: config.json with auto_map, the model code,
        sharded safetensors). In an exported copy without openmoe: transformers' own, which copies this code too."""
        try:
            from openmoe.io.hf import save_pretrained as write
        except ImportError:
            return super().save_pretrained(save_directory, **kwargs)
        return write(self, save_directory, **kwargs)


def _checkpoint_shapes(directory: str, names: list[str]) -> dict[str, tuple]:
    """Stored shapes of `names` in a local checkpoint directory (safetensors headers; .bin shards memory-mapped)."""
    shapes = {}
    if not os.path.isdir(directory):
        return shapes
    for fname in sorted(os.listdir(directory)):
        path = os.path.join(directory, fname)
        if fname.endswith(".safetensors"):
            with open(path, "rb") as f:  # 8-byte little-endian header length, then the JSON header
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k in names})
        elif fname.endswith(".bin"):
            shard = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            shapes.update({k: tuple(v.shape) for k, v in shard.items() if k in names})
    return shapes


def _init(p: torch.Tensor, std: float | None) -> None:
    """N(0, std), or ones for std None; skipped for a parameter transformers 5 marks as loaded."""
    if getattr(p, "_is_hf_initialized", False):
        return
    if std is None:
        p.fill_(1.0)
    else:
        p.normal_(0.0, std)


def router_losses(moe: list[MoeAux], aux_factor: float, z_factor: float, like: torch.Tensor):
    """Weighted means over MoE layers of the router aux loss and router z-loss."""
    if not moe:
        zero = like.new_zeros((), dtype=torch.float32)
        return zero, zero
    aux = torch.stack([m.aux_loss for m in moe]).mean()
    z = torch.stack([m.z_loss for m in moe]).mean()
    return aux_factor * aux, z_factor * z
