"""Sparse upcycling: a dense HF LLaMA checkpoint -> our llama_moe checkpoint whose experts are copies of the FFN.

    python -m openmoe.convert upcycle --dense /ckpt/llama --num_experts 8 --top_k 2 --moe_start_layer 16 \\
        --moe_layer_interval 2 --output /ckpt/llama-moe
    python -m openmoe.convert upcycle --dense DIR --num_experts 8 --top_k 2 --router_init /ckpt/other-moe --output DIR

Shapes: H hidden, I intermediate, E experts, V vocabulary.

Reads a `LlamaForCausalLM` directory (config.json parsed by transformers' LlamaConfig, weights as safetensors or
pytorch_model.bin, sharded or not) and writes our HF-format checkpoint (model_family "llama_moe") that
`OpenMoeForCausalLM.from_pretrained` and the trainer's `--pretrained` load. Layer i becomes MoE iff
i >= moe_start_layer and (i - moe_start_layer) % moe_layer_interval == 0; its FFN (gate_proj [I, H], up_proj [I, H],
down_proj [H, I]) is copied into every expert (wi_gate[e] = gate_proj.T [H, I], wi_up[e] = up_proj.T, wo[e] =
down_proj.T [I, H]); every other tensor keeps its LLaMA name, which is already ours.

Function preserving: combine weights are the top-k probabilities renormalised to sum 1 (router_combine
"normalized"), so k identical experts sum to the dense FFN whatever the router says, as long as no choice is dropped.
The eval capacity factor defaults to 0 (dropless, as Mixtral); training drops choices over capacity (a dropped choice
loses its share of the FFN), so the train factor is a flag. The router starts at N(0, router_init_std) (small:
near-uniform routing, the experts differentiate through training) or, with `--router_init PATH`, from another MoE
checkpoint's routers (ours: `mlp.gate_weight`, or Mixtral's `block_sparse_moe.gate.weight`) for the same layers.

A tied LLaMA (tie_word_embeddings) is untied: lm_head gets a copy of embed_tokens (same function; the two train
apart afterwards). Unsupported LLaMA features raise: rope_scaling, attention/MLP biases, other activations.

The dense directory's tokenizer (or --tokenizer) is written into the export; an existing non-empty --output needs
--overwrite (convert/output.py).
"""

from __future__ import annotations

import json
import os

import torch

from openmoe.config import CONFIG_NAME, ROUTER_COMBINE, OpenMoeConfig
from openmoe.convert.output import (
    add_output_arguments,
    add_tokenizer_argument,
    check_output,
    no_tokenizer_note,
    source_tokenizer,
)
from openmoe.convert.t5x import parse_size
from openmoe.io.hf import (
    ShardWriter,
    atomic_directory,
    check_state_dict,
    parse_dtype,
    read_tensors,
    write_tokenizer,
)

FFN = ("gate_proj", "up_proj", "down_proj")


# --- the dense LLaMA checkpoint ---
def read_llama_config(path: str):
    """transformers.LlamaConfig of a checkpoint directory, after checking that we can reproduce its model."""
    from transformers import LlamaConfig

    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: expected a HF LlamaForCausalLM checkpoint directory")
    with open(cfg_path) as f:
        model_type = json.load(f).get("model_type")
    if model_type != "llama":
        raise ValueError(f"{cfg_path} has model_type '{model_type}'; accepted: 'llama' (a LlamaForCausalLM checkpoint)")
    hf = LlamaConfig.from_pretrained(path)
    problems = []
    if hf.rope_scaling is not None:
        problems.append(f"rope_scaling {hf.rope_scaling} (accepted: null, plain RoPE)")
    if hf.hidden_act != "silu":
        problems.append(f"hidden_act '{hf.hidden_act}' (accepted: 'silu')")
    if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
        problems.append(f"attention_bias={hf.attention_bias}, mlp_bias={hf.mlp_bias} (accepted: false)")
    if problems:
        raise ValueError(f"{cfg_path} uses LLaMA features that model_family 'llama_moe' does not implement: "
                         + "; ".join(problems))
    return hf


def read_llama_weights(path: str, hf) -> dict[str, torch.Tensor]:
    """State dict with our (= HF LLaMA's) names; a tied lm_head becomes a copy of embed_tokens."""
    sd = {k: v for k, v in read_tensors(path).items() if not k.endswith("rotary_emb.inv_freq")}
    if "lm_head.weight" not in sd:
        if not hf.tie_word_embeddings:
            raise ValueError(f"{path} has no lm_head.weight and tie_word_embeddings is false")
        print("note: tie_word_embeddings=true; lm_head gets a copy of embed_tokens (untied from here on)")
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    return sd


def llama_moe_config(hf, *, num_experts: int, top_k: int, moe_start_layer: int, moe_layer_interval: int,
                     **fields) -> OpenMoeConfig:
    """Our config for a MoE built from `hf` (transformers.LlamaConfig). `fields`: any other OpenMoeConfig field
    (routing, losses, moe_intermediate_size, ...). No label smoothing and no output z-loss unless asked for."""
    pad = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id  # fills finished rows in generation
    base = dict(
        model_family="llama_moe", vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size, num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads, num_key_value_heads=hf.num_key_value_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        max_position_embeddings=hf.max_position_embeddings, rope_theta=float(hf.rope_theta),
        rms_norm_eps=hf.rms_norm_eps, initializer_range=hf.initializer_range,
        bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id, pad_token_id=pad,
        num_experts=num_experts, router_topk=top_k, moe_start_layer=moe_start_layer,
        moe_layer_interval=moe_layer_interval, label_smoothing=0.0, z_loss_factor=0.0)
    return OpenMoeConfig(**{**base, **fields})


def dense_ffn(sd: dict[str, torch.Tensor], layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate_proj [I, H], up_proj [I, H], down_proj [H, I]) of one dense layer."""
    return tuple(sd[f"model.layers.{layer}.mlp.{name}.weight"] for name in FFN)


def build_moe_state_dict(dense: dict[str, torch.Tensor], config: OpenMoeConfig, experts_of, router_of,
                         source: str) -> dict[str, torch.Tensor]:
    """Replace each MoE layer's FFN by `router_of(i)` -> gate_weight [E, H] and `experts_of(i, gate, up, down)` ->
    (wi_gate [E, H, I_e], wi_up [E, H, I_e], wo [E, I_e, H]); check every key and shape against our model."""
    from openmoe.model import OpenMoeForCausalLM

    sd = dict(dense)
    for i in range(config.num_hidden_layers):
        if not config.is_moe_layer(i):
            continue
        ffn = [sd.pop(f"model.layers.{i}.mlp.{name}.weight") for name in FFN]
        p = f"model.layers.{i}.mlp."
        sd[p + "gate_weight"] = router_of(i)
        sd[p + "experts.wi_gate"], sd[p + "experts.wi_up"], sd[p + "experts.wo"] = experts_of(i, *ffn)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in OpenMoeForCausalLM(config, init=False).state_dict().items()}
    check_state_dict(expected, sd, source)
    return {k: sd[k] for k in expected}  # our state-dict order


# --- upcycling proper ---
def copy_experts(num_experts: int):
    def experts_of(i, gate, up, down):  # gate/up [I, H], down [H, I]
        # expanded views (no memory): each stack is materialised only when its shard is written
        stack = lambda w: w.t().unsqueeze(0).expand(num_experts, -1, -1)  # noqa: E731
        return stack(gate), stack(up), stack(down)  # [E, H, I], [E, H, I], [E, I, H]

    return experts_of


def random_router(config: OpenMoeConfig, std: float, seed: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)

    def router_of(i):
        return (torch.randn(config.num_experts, config.hidden_size, generator=g) * std).to(dtype)

    return router_of


def routers_from_checkpoint(path: str, config: OpenMoeConfig, dtype: torch.dtype):
    """gate_weight [E, H] of every MoE layer, read from our MoE checkpoint or a Mixtral one at `path`."""
    moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    names = {i: (f"model.layers.{i}.mlp.gate_weight", f"model.layers.{i}.block_sparse_moe.gate.weight")
             for i in moe_layers}
    wanted = {n for pair in names.values() for n in pair}
    found = read_tensors(path, select=lambda name: None if name in wanted else False)
    routers, missing, wrong = {}, [], []
    for i, pair in names.items():
        hit = [n for n in pair if n in found]
        if not hit:
            missing.append(i)
            continue
        w = found[hit[0]]
        if tuple(w.shape) != (config.num_experts, config.hidden_size):
            wrong.append(f"layer {i}: {tuple(w.shape)}")
        routers[i] = w.to(dtype)
    problems = ([f"no router for MoE layer(s) {missing}"] if missing else []) + (
        [f"wrong router shape(s), want [num_experts={config.num_experts}, hidden_size={config.hidden_size}]: "
         f"{'; '.join(wrong)}"] if wrong else [])
    if problems:
        raise ValueError(f"--router_init {path} does not fit: " + "; ".join(problems))
    return lambda i: routers[i].clone()


def write_streamed(output: str, config: OpenMoeConfig, sd: dict[str, torch.Tensor], max_shard_bytes: int,
                   tokenizer=None) -> None:
    """Like openmoe.io.hf.write_checkpoint (atomic directory, safetensors shards + index, the tokenizer's files), but
    each tensor is made contiguous only as it joins its shard: RAM stays near the dense model plus one shard, not
    the E-fold MoE."""
    with atomic_directory(output) as tmp:
        if tokenizer is not None:
            config = write_tokenizer(tmp, config, tokenizer)
        config.save(tmp)
        writer = ShardWriter(tmp, max_shard_bytes)
        for name, t in sd.items():
            writer.reserve(t.numel() * t.element_size())  # flush the open shard before materialising
            writer.add(name, t.contiguous())
        writer.finish()


def upcycle(dense: str, output: str, num_experts: int, top_k: int, moe_start_layer: int = 0,
            moe_layer_interval: int = 1, router_init: str = "random", router_init_std: float | None = None,
            seed: int = 0, dtype: str | None = None, max_shard_bytes: int = 2 * 10**9, overwrite: bool = False,
            tokenizer: str | None = None, **fields) -> OpenMoeConfig:
    """Convert; returns the written config. `fields`: further OpenMoeConfig fields (router_combine, capacity...).
    overwrite: replace an existing non-empty `output`; tokenizer: the export's tokenizer (default: the dense one)."""
    check_output(output, overwrite, (dense, None if router_init == "random" else router_init, tokenizer))
    hf = read_llama_config(dense)
    fields = {"router_combine": "normalized", "router_capacity_factor_eval": 0.0, **fields}
    config = llama_moe_config(hf, num_experts=num_experts, top_k=top_k, moe_start_layer=moe_start_layer,
                              moe_layer_interval=moe_layer_interval, **fields)
    tok = source_tokenizer(config, dense, tokenizer)
    sd = read_llama_weights(dense, hf)
    out_dtype = parse_dtype(dtype) or sd["model.embed_tokens.weight"].dtype
    sd = {k: v.to(out_dtype) for k, v in sd.items()}
    if router_init == "random":
        std = config.initializer_range if router_init_std is None else router_init_std
        router_of = random_router(config, std, seed, out_dtype)
    else:
        router_of = routers_from_checkpoint(router_init, config, out_dtype)
    sd = build_moe_state_dict(sd, config, copy_experts(num_experts), router_of, dense)
    write_streamed(output, config, sd, max_shard_bytes, tok)
    moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    print(f"upcycled {dense} -> {output}: MoE layers {moe_layers}, {num_experts} experts, top-{top_k}, "
          f"router {router_init}, combine '{config.router_combine}'")
    if tok is None:
        print(no_tokenizer_note(output, dense, "--dense"))
    return config


# --- CLI ---
def add_moe_arguments(p, default_combine: str) -> None:
    """Flags shared by the converters that turn a dense LLaMA into an MoE."""
    p.add_argument("--dense", required=True, help="HF LlamaForCausalLM checkpoint directory")
    add_output_arguments(p, "our HF-format")
    p.add_argument("--num_experts", type=int, required=True)
    p.add_argument("--top_k", type=int, required=True)
    p.add_argument("--moe_start_layer", type=int, default=0, help="first MoE layer (default 0)")
    p.add_argument("--moe_layer_interval", type=int, default=1, help="every N-th layer from the first is MoE")
    p.add_argument("--router_combine", choices=ROUTER_COMBINE, default=default_combine,
                   help=f"combine weights of the chosen experts (default {default_combine})")
    p.add_argument("--capacity_factor_train", type=float, default=1.25, help="<= 0: dropless (default 1.25)")
    p.add_argument("--capacity_factor_eval", type=float, default=0.0, help="<= 0: dropless (default 0)")
    p.add_argument("--router_aux_loss_factor", type=float, default=0.01)
    p.add_argument("--router_z_loss_factor", type=float, default=0.001)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="output dtype; default: as stored")
    p.add_argument("--max_shard_size", default="2GB", help="largest safetensors shard (default 2GB)")
    p.add_argument("--seed", type=int, default=0)


def moe_fields(args) -> dict:
    return dict(router_combine=args.router_combine, router_capacity_factor_train=args.capacity_factor_train,
                router_capacity_factor_eval=args.capacity_factor_eval,
                router_aux_loss_factor=args.router_aux_loss_factor, router_z_loss_factor=args.router_z_loss_factor)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("upcycle", help="dense HF LLaMA -> llama_moe checkpoint, every expert a copy of the FFN",
                              description=__doc__.split("\n\n")[0])
    add_moe_arguments(p, default_combine="normalized")
    p.add_argument("--router_init", default="random",
                   help="'random' (N(0, --router_init_std)) or an MoE checkpoint directory (ours or Mixtral) whose "
                        "routers for the same layers are copied")
    p.add_argument("--router_init_std", type=float, default=None, help="default: the LLaMA initializer_range")
    add_tokenizer_argument(p, "--dense")
    p.set_defaults(func=_run)


def _run(args) -> None:
    upcycle(args.dense, args.output, args.num_experts, args.top_k, args.moe_start_layer, args.moe_layer_interval,
            args.router_init, args.router_init_std, args.seed, args.dtype, parse_size(args.max_shard_size),
            args.overwrite, args.tokenizer, **moe_fields(args))
