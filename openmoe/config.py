"""OpenMoE architecture configuration: named presets and the HF ``config.json`` of the published checkpoints.

`OpenMoeConfig` (a transformers PretrainedConfig, model_type "openmoe") holds only what a checkpoint needs (shapes,
routing rule, loss factors the model was trained with). Kernels and memory trade-offs are `ModelOptions`, given to
the model, never stored in a checkpoint; parallel sizes belong to the trainer's run config.

Two model families share one implementation (router, experts, losses, expert-parallel layer); `model_family` picks
the conventions that differ, every other new field is an independent switch whose default is OpenMoE's behaviour:

  =====================  ===========================================  ==========================================
  model_family           "openmoe" (default: the published models)     "llama_moe" (MoE built from HF LLaMA)
  attention logits       unscaled (T5: folded into the query init)     scaled by 1/sqrt(head_dim)
  MLP / expert           double-gated SwiGLU, gate 2I wide             3-matrix SwiGLU silu(x Wg) * (x Wu) Wd, gate
                         (hidden_act "swiglu")                         I wide (hidden_act "silu")
  MoE layers             + extra dense MLP with its own pre-norm       no extra MLP
  KV heads               num_key_value_heads == num_attention_heads    grouped KV heads allowed (repeat_kv)
  <pad> BOS              a token, always visible and routed            no: padding is padding
  =====================  ===========================================  ==========================================
RoPE (rotate-half, inv_freq = rope_theta^(-2i/D), no rope_scaling) is the same in both and equals HF's
LlamaRotaryEmbedding with rope_scaling None.

Two spellings of ``config.json`` exist and both are read:
  * hub (``OrionZheng/openmoe-{base,8b,8b-chat,34b-200B}``): ``router_topk``, ``router_capacity_factor_train``, ...
  * older example configs (``hpcai-tech/openmoe-{base,8b}``): ``topk``, ``capacity_factor_train``, ``min_capacity``,
    ``layer_norm_epsilon``, ``gated``.
and the published `model_type: "llama"` with OpenMoE fields. We write the hub spelling with model_type "openmoe"
and an auto_map naming the model code copied beside it (MODEL_CODE_FILES), whatever auto_map was read.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import shutil
from dataclasses import dataclass

from transformers import PretrainedConfig

CONFIG_NAME = "config.json"
# The model-layer files, shipped with every export so that the directory loads with trust_remote_code where only
# torch + transformers + safetensors are installed. They import nothing but those and each other (relatively);
# model.py imports every sibling directly because transformers copies only the auto_map module's direct relative
# imports out of a local directory.
MODEL_CODE_FILES = ("config.py", "router.py", "losses.py", "moe.py", "model.py")
AUTO_MAP = {"AutoConfig": "config.OpenMoeConfig", "AutoModelForCausalLM": "model.OpenMoeForCausalLM"}


class OpenMoeConfig(PretrainedConfig):
    """The architecture (what a checkpoint needs); every field is an __init__ argument, its default OpenMoE's
    behaviour. Shape defaults are the `tiny` preset's; a config.json missing a shape field is refused (from_dict)."""

    model_type = "openmoe"
    _auto_class = "AutoConfig"  # transformers' own save_pretrained (in an export without openmoe) copies our code

    def __init__(
        self,
        # --- shapes ---
        vocab_size: int = 1024,
        hidden_size: int = 64,
        intermediate_size: int = 128,  # I: width of the up projection; the gate is 2I wide ("double-gated" SwiGLU)
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        head_dim: int = 16,  # heads*head_dim need not equal hidden_size (8B: 24*128=3072 vs 2048)
        num_experts: int = 4,
        moe_layer_interval: int = 2,  # layer i (0-based) is MoE when (i + 1) % moe_layer_interval == 0
        max_position_embeddings: int = 2048,
        rope_theta: float = 1e4,
        rms_norm_eps: float = 1e-6,
        # --- routing (ST-MoE / Switch conventions as in the T5X training runs) ---
        router_topk: int = 2,
        router_capacity_factor_train: float = 1.25,  # <= 0 means dropless (every token reaches its experts)
        router_capacity_factor_eval: float = 2.0,  # larger at eval: dropping hurts quality more than it saves there
        router_min_capacity: int = 4,
        router_drop_tks: bool = True,  # False: never drop (dropless), whatever the capacity factor
        # --- losses ---
        router_aux_loss_factor: float = 0.01,
        router_z_loss_factor: float = 0.0001,
        z_loss_factor: float = 0.01,  # output (logits) z-loss
        label_smoothing: float = 0.001,
        # --- tokens and init ---
        bos_token_id: int = 0,  # OpenMoE uses <pad> (id 0) as BOS
        eos_token_id: int = 1,
        pad_token_id: int = 0,
        initializer_range: float = 0.02,
        # Fields of the published config with a single supported value (validated below).
        hidden_act: str | None = None,  # None -> the family's: "swiglu" (openmoe, double-gated) or "silu" (llama_moe)
        mlp_gated: bool = True,
        tie_word_embeddings: bool = False,
        num_key_value_heads: int | None = None,  # None -> num_attention_heads (OpenMoE has no GQA; llama_moe may)
        # --- family and MoE generalisation; each default ("off" value) is OpenMoE's behaviour ---
        model_family: str = "openmoe",  # "openmoe" | "llama_moe": conventions that differ, see the module docstring
        moe_start_layer: int | None = None,  # first MoE layer; None -> moe_layer_interval - 1 (OpenMoE's rule)
        moe_intermediate_size: int | None = None,  # width of one expert; None -> intermediate_size (MoEfied: I / E)
        num_shared_experts: int = 0,  # always-on dense MLP of width num_shared_experts * expert width; 0 off
        router_combine: str = "prob",  # "prob" raw softmax prob | "normalized" top-k renormalised | "ones" weight 1
        router_aux_loss_type: str = "switch",  # "switch": E*sum f_e P_e over the batch | "seq": DeepSeek per sequence
        **kwargs,  # other keys of a config.json (published extras, transformers' own): kept and written back
    ):
        named = dict(locals())  # the arguments above, by name
        for name in _OUR_FIELDS:  # token ids and tie_word_embeddings are set by PretrainedConfig below
            setattr(self, name, named[name])
        if hidden_act is None:
            self.hidden_act = _FAMILY_ACT.get(model_family)
        if num_key_value_heads is None:
            self.num_key_value_heads = num_attention_heads
        for written_by_us in ("auto_map", "architectures", "model_type"):  # always ours, whatever was read
            kwargs.pop(written_by_us, None)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.auto_map = dict(AUTO_MAP)  # this code, not the one a published config.json named
        self.validate()

    def validate(self) -> None:
        if self.model_family not in _FAMILY_ACT:
            raise ValueError(f"model_family '{self.model_family}' is not supported; accepted: {sorted(_FAMILY_ACT)}")
        act = _FAMILY_ACT[self.model_family]
        llama = self.model_family == "llama_moe"
        n_layers, kv, heads = self.num_hidden_layers, self.num_key_value_heads, self.num_attention_heads
        checks = [
            (kv == heads or (llama and kv >= 1 and heads % kv == 0),
             f"num_key_value_heads ({kv}) must equal num_attention_heads ({heads}): OpenMoE has no grouped KV heads"
             if not llama else f"num_key_value_heads ({kv}) must divide num_attention_heads ({heads})"),
            (self.hidden_act == act, f"hidden_act '{self.hidden_act}' is not supported by model_family "
                                     f"'{self.model_family}'; accepted: '{act}'"),
            (self.mlp_gated is True, f"mlp_gated={self.mlp_gated} is not supported; OpenMoE's MLPs are gated"),
            (self.tie_word_embeddings is False,
             f"tie_word_embeddings={self.tie_word_embeddings} is not supported; the lm_head is untied (a converter "
             "unties a tied checkpoint by copying embed_tokens into lm_head)"),
            (1 <= self.num_experts <= MAX_EXPERTS,
             f"num_experts ({self.num_experts}) must be in [1, {MAX_EXPERTS}] (expert ids are sorted as int16)"),
            (1 <= self.router_topk <= self.num_experts,
             f"router_topk ({self.router_topk}) must be in [1, num_experts={self.num_experts}]"),
            (self.moe_layer_interval >= 1, f"moe_layer_interval ({self.moe_layer_interval}) must be >= 1"),
            (self.moe_start_layer is None or 0 <= self.moe_start_layer < n_layers,
             f"moe_start_layer ({self.moe_start_layer}) must be in [0, num_hidden_layers={n_layers}) "
             "(None: moe_layer_interval - 1, OpenMoE's rule)"),
            (self.moe_intermediate_size is None or self.moe_intermediate_size >= 1,
             f"moe_intermediate_size ({self.moe_intermediate_size}) must be >= 1 (None: intermediate_size)"),
            (self.num_shared_experts >= 0, f"num_shared_experts ({self.num_shared_experts}) must be >= 0 (0: off)"),
            (self.router_combine in ROUTER_COMBINE,
             f"router_combine '{self.router_combine}' is not supported; accepted: {list(ROUTER_COMBINE)}"),
            (self.router_aux_loss_type in ROUTER_AUX_LOSS_TYPES,
             f"router_aux_loss_type '{self.router_aux_loss_type}' is not supported; "
             f"accepted: {list(ROUTER_AUX_LOSS_TYPES)}"),
            (self.head_dim % 2 == 0, f"head_dim ({self.head_dim}) must be even for rotary embeddings"),
            (0.0 <= self.label_smoothing < 1.0, f"label_smoothing ({self.label_smoothing}) must be in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    # --- derived ---
    @property
    def first_moe_layer(self) -> int:
        return self.moe_layer_interval - 1 if self.moe_start_layer is None else self.moe_start_layer

    def is_moe_layer(self, layer_idx: int) -> bool:
        """i >= start and (i - start) % interval == 0. With moe_start_layer None (start = interval - 1) this is
        OpenMoE's (i + 1) % interval == 0 exactly."""
        start = self.first_moe_layer
        return layer_idx >= start and (layer_idx - start) % self.moe_layer_interval == 0

    @property
    def expert_intermediate_size(self) -> int:
        return self.intermediate_size if self.moe_intermediate_size is None else self.moe_intermediate_size

    # Conventions fixed by the family (module docstring).
    @property
    def double_gated_mlp(self) -> bool:
        return self.model_family == "openmoe"

    @property
    def attention_scale(self) -> float:
        return 1.0 if self.model_family == "openmoe" else self.head_dim**-0.5

    @property
    def extra_mlp(self) -> bool:
        return self.model_family == "openmoe"

    @property
    def pad_is_bos(self) -> bool:
        return self.model_family == "openmoe"

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def replace(self, **changes) -> "OpenMoeConfig":
        """A validated copy with `changes` applied (names must be existing fields)."""
        unknown = sorted(k for k in changes if not hasattr(self, k))
        if unknown:
            raise ValueError(f"unknown OpenMoeConfig field(s) {unknown}")
        new = copy.deepcopy(self)
        for k, v in changes.items():
            setattr(new, k, v)
        new.validate()
        return new

    def __eq__(self, other) -> bool:
        return isinstance(other, OpenMoeConfig) and _comparable(self) == _comparable(other)

    __hash__ = None

    # --- config.json ---
    def to_dict(self) -> dict:
        d = super().to_dict()
        d.update(model_type=self.model_type, architectures=["OpenMoeForCausalLM"], auto_map=dict(AUTO_MAP))
        return d

    def to_diff_dict(self) -> dict:
        """transformers' config.json content: everything but its own generic defaults, and always every field of
        ours (a reader of the published spelling needs the shapes even where they equal our defaults)."""
        d, generic = self.to_dict(), PretrainedConfig().to_dict()
        keep = set(_OUR_FIELDS) | {"model_type", "architectures", "auto_map", "transformers_version"}
        return {k: v for k, v in d.items() if k in keep or k not in generic or generic[k] != v}

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """Any spelling of the published configs: hub (`router_topk`, ...), older examples (`topk`, ...), and
        model_type "llama" with OpenMoE fields. `source` names the file in errors."""
        source = kwargs.pop("source", "config")
        d = dict(config_dict)
        for old, new in _OLD_SPELLINGS.items():
            if old in d:
                value = d.pop(old)
                d.setdefault(new, value)
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ValueError(f"{source} is missing required field(s) {missing}; found {sorted(config_dict)}")
        for dropped in _LLAMA_LEFTOVERS:
            d.pop(dropped, None)
        return super().from_dict(d, **kwargs)

    def save(self, directory: str) -> str:
        """config.json (with auto_map) and the model code it names; returns the config.json path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        self.to_json_file(path, use_diff=True)
        write_model_code(directory)
        return path

    @classmethod
    def load(cls, path: str) -> "OpenMoeConfig":
        """`path` is a checkpoint directory or a config.json file."""
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no OpenMoE config at {path}")
        return cls.from_dict(cls._dict_from_json_file(path), source=path)


def write_model_code(directory: str) -> None:
    """Copy the model-layer files (MODEL_CODE_FILES) next to a config.json whose auto_map names them."""
    here = os.path.dirname(os.path.abspath(__file__))
    for name in MODEL_CODE_FILES:
        shutil.copyfile(os.path.join(here, name), os.path.join(directory, name))


def _comparable(config: OpenMoeConfig) -> dict:
    d = config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype"):
        d.pop(volatile, None)
    return d


_OUR_FIELDS = list(inspect.signature(OpenMoeConfig.__init__).parameters)[1:-1]  # every named argument

ATTN_IMPLS = ("sdpa", "eager")
EXPERT_IMPLS = ("bmm", "grouped")
LM_LOSS_IMPLS = ("fused", "fused_compiled", "chunked")
AC_POLICIES = ("full", "selective")


@dataclass(frozen=True)
class ModelOptions:
    """How the model computes, not what it computes: kernels and memory trade-offs that a checkpoint does not need.

    Given at construction (`OpenMoeForCausalLM(config, options=...)`) or applied once to a loaded model
    (`model.apply_options(options)`, before any expert-parallel wrapping). Every default is the reference ("off")
    behaviour, which the fast paths are tested against. Parallel sizes are not options of the model at all.
    """

    # attention kernel: "sdpa" (torch scaled_dot_product_attention, flash/efficient kernels where available) |
    # "eager" (the fp32 softmax(q k^T) v reference). Off: "sdpa" is the default and numerically the reference.
    attn_impl: str = "sdpa"
    # experts: "bmm" (capacity buffer [E, C, H] and batched matmuls: the reference) | "grouped" (kept tokens sorted
    # by expert, one torch._grouped_mm per weight, no padding FLOPs). Off: "bmm".
    expert_impl: str = "bmm"
    # LM head + loss in training: "fused" (gradient computed chunk by chunk in the forward pass, no [T, V] logits)
    # | "fused_compiled" (the same, its softmax math through torch.compile) | "chunked" (checkpointed autograd
    # reference). Without gradients (eval) every choice runs the chunked reference. Off: "chunked".
    lm_loss_impl: str = "fused"
    # tokens per LM-head/loss chunk; None: one pass over all tokens (materialises [T, V] fp32 logits). Off: None.
    lm_head_chunk_size: int | None = 1024
    # recompute each decoder layer in backward (training only). Off: False.
    activation_checkpointing: bool = False
    # what activation checkpointing keeps: "full" (only each layer's input; everything is recomputed) |
    # "selective" (also the matmul and attention outputs; only elementwise ops are recomputed). Ignored when
    # activation_checkpointing is False.
    ac_policy: str = "full"
    # route every token (capacity factors of train and eval forced to 0, i.e. no drops: outputs do not depend on
    # the rest of the batch; the bmm path reads the largest expert load on the host once per layer). Off: False,
    # the checkpoint's capacity factors.
    dropless: bool = False
    # every RMSNorm through NVIDIA apex's fused_rms_norm_affine (needs apex; one clear error without). Off: False.
    fused_rmsnorm: bool = False

    def to_dict(self) -> dict:
        """Plain values (transformers serialises the keyword arguments of from_pretrained, options included, when
        it builds a generation config)."""
        return dataclasses.asdict(self)

    def __post_init__(self):
        choices = (("attn_impl", ATTN_IMPLS), ("expert_impl", EXPERT_IMPLS), ("lm_loss_impl", LM_LOSS_IMPLS),
                   ("ac_policy", AC_POLICIES))
        for name, accepted in choices:
            if getattr(self, name) not in accepted:
                raise ValueError(f"{name} '{getattr(self, name)}' is not supported; accepted: {list(accepted)}")
        chunk = self.lm_head_chunk_size
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"lm_head_chunk_size ({chunk!r}) must be a positive integer or None (one pass)")
        for name in ("activation_checkpointing", "dropless", "fused_rmsnorm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} ({getattr(self, name)!r}) must be True or False")

    def replace(self, **changes) -> "ModelOptions":
        return dataclasses.replace(self, **changes)


_FAMILY_ACT = {"openmoe": "swiglu", "llama_moe": "silu"}  # family -> its only hidden_act
# Combine weight of a kept choice: "prob" its softmax probability (OpenMoE/T5X), "normalized" the top-k probabilities
# renormalised to sum to 1 (Mixtral, Qwen's norm_topk_prob: identical experts then reproduce the dense FFN), "ones"
# weight 1 (MoEfication: with top_k = num_experts the experts' sum is the dense FFN; the router then learns only from
# its aux/z losses or a separate gate-training objective).
ROUTER_COMBINE = ("prob", "normalized", "ones")
ROUTER_AUX_LOSS_TYPES = ("switch", "seq")  # see losses.router_aux_loss / router_aux_loss_seq
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "head_dim", "num_experts", "moe_layer_interval")
_OLD_SPELLINGS = {  # hpcai-tech/openmoe-* example configs -> hub spelling
    "topk": "router_topk",
    "capacity_factor_train": "router_capacity_factor_train",
    "capacity_factor_eval": "router_capacity_factor_eval",
    "min_capacity": "router_min_capacity",
    "drop_tks": "router_drop_tks",
    "layer_norm_epsilon": "rms_norm_eps",
    "gated": "mlp_gated",
}
_LLAMA_LEFTOVERS = ("rope_scaling", "pretraining_tp")  # written by our older exports (model_type "llama"); unused

MAX_EXPERTS = 32766  # expert ids and the "no expert" key (num_experts) are sorted as int16 (openmoe/router.py)
_VOCAB = 256384  # umT5 sentencepiece vocabulary of the published models
PRESETS: dict[str, dict] = {
    # A few MB: unit tests and the CPU default run. Vocabulary sized for the tokenizer shipped in tests/assets.
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 head_dim=16, num_experts=4, moe_layer_interval=2, max_position_embeddings=512),
    "base": dict(vocab_size=_VOCAB, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, head_dim=64, num_experts=16, moe_layer_interval=4),
    "8b": dict(vocab_size=_VOCAB, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
               num_attention_heads=24, head_dim=128, num_experts=32, moe_layer_interval=6),
    "34b": dict(vocab_size=_VOCAB, hidden_size=3072, intermediate_size=12288, num_hidden_layers=32,
                num_attention_heads=24, head_dim=128, num_experts=32, moe_layer_interval=4),
}


def preset(name: str, **overrides) -> OpenMoeConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown OpenMoE preset '{name}'; accepted: {sorted(PRESETS)}")
    return OpenMoeConfig(**{**PRESETS[name], **overrides})
