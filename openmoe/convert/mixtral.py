"""Export a llama_moe checkpoint of ours as a HF `MixtralForCausalLM` checkpoint.

    python -m openmoe.convert mixtral --moe /ckpt/llama-moe --output /ckpt/llama-moe-mixtral [--dtype bf16]

Shapes: H hidden, I expert width, E experts.

Mixtral is exactly our llama_moe family under these conditions, each checked (an error names every one that fails):
every layer is MoE (moe_start_layer 0, moe_layer_interval 1), no shared experts, renormalised top-k combine weights
(router_combine "normalized"), and the LLaMA conventions (model_family "llama_moe"). Mixtral is dropless: its output
equals ours when ours routes without dropping (router_capacity_factor_eval <= 0, the upcycle default); a note is
printed otherwise. Names: our gate_weight [E, H] is `block_sparse_moe.gate.weight`; expert e's w1 / w3 / w2 are
wi_gate[e].T [I, H] / wi_up[e].T [I, H] / wo[e].T [H, I]; everything else keeps its name. The router's losses are not
part of the function: router_aux_loss_factor becomes router_aux_loss_coef, the z-loss factor is dropped.

The --moe directory's tokenizer (or --tokenizer) is written into the export with its generation_config.json; an
existing non-empty --output needs --overwrite (convert/output.py).
"""

from __future__ import annotations

import os

import torch

from openmoe.config import OpenMoeConfig
from openmoe.convert.output import (
    add_output_arguments,
    add_tokenizer_argument,
    check_output,
    no_tokenizer_note,
    source_tokenizer,
)
from openmoe.convert.t5x import parse_size
from openmoe.io.hf import ShardWriter, atomic_directory, parse_dtype, read_tensors, write_tokenizer


def check_exportable(config: OpenMoeConfig) -> None:
    moe = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    dense = [i for i in range(config.num_hidden_layers) if not config.is_moe_layer(i)]
    problems = []
    if config.model_family != "llama_moe":
        problems.append(f"model_family '{config.model_family}' (Mixtral needs 'llama_moe': scaled attention, "
                        "3-matrix SwiGLU, no extra MLP)")
    if dense:
        problems.append(f"layers {dense} are dense (Mixtral has MoE in every layer; MoE layers here: {moe})")
    if config.num_shared_experts:
        problems.append(f"num_shared_experts={config.num_shared_experts} (Mixtral has no shared experts)")
    if config.router_combine != "normalized":
        problems.append(f"router_combine '{config.router_combine}' (Mixtral renormalises the top-k weights: "
                        "'normalized')")
    if problems:
        raise ValueError("cannot export as Mixtral: " + "; ".join(problems))


def mixtral_config(config: OpenMoeConfig, dtype: torch.dtype):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.expert_intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta, sliding_window=None,
        num_local_experts=config.num_experts, num_experts_per_tok=config.router_topk,
        router_aux_loss_coef=config.router_aux_loss_factor, initializer_range=config.initializer_range,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        tie_word_embeddings=False, torch_dtype=dtype, architectures=["MixtralForCausalLM"])


def mixtral_tensors(sd: dict[str, torch.Tensor], config: OpenMoeConfig):
    """Yield (Mixtral name, tensor) in our state-dict order, experts split out of the stacks."""
    for key, t in sd.items():
        layer_prefix, sep, rest = key.partition(".mlp.")
        if not sep:
            yield key, t
        elif rest == "gate_weight":
            yield f"{layer_prefix}.block_sparse_moe.gate.weight", t
        else:
            name = {"experts.wi_gate": "w1", "experts.wi_up": "w3", "experts.wo": "w2"}[rest]
            for e in range(config.num_experts):
                yield f"{layer_prefix}.block_sparse_moe.experts.{e}.{name}.weight", t[e].t().contiguous()


def export_mixtral(moe: str, output: str, dtype: str | None = None, max_shard_bytes: int = 2 * 10**9,
                   overwrite: bool = False, tokenizer: str | None = None) -> None:
    """overwrite: replace an existing non-empty `output`; tokenizer: the export's tokenizer (default: `moe`'s)."""
    from openmoe.io.hf import check_state_dict
    from openmoe.model import OpenMoeForCausalLM

    check_output(output, overwrite, (moe, tokenizer))
    config = OpenMoeConfig.load(moe)
    check_exportable(config)
    tok = source_tokenizer(config, moe, tokenizer)
    sd = read_tensors(moe)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in OpenMoeForCausalLM(config, init=False).state_dict().items()}
    check_state_dict(expected, sd, moe)
    out_dtype = parse_dtype(dtype) or sd["model.embed_tokens.weight"].dtype
    sd = {k: sd[k].to(out_dtype) for k in expected}
    with atomic_directory(output) as tmp:
        mixtral_config(config, out_dtype).save_pretrained(tmp)
        if tok is not None:
            # the returned tokenizer_class is for our config.json: transformers maps MixtralConfig to a tokenizer
            write_tokenizer(tmp, config, tok)
        writer = ShardWriter(tmp, max_shard_bytes)
        for name, t in mixtral_tensors(sd, config):
            writer.add(name, t)
        files = writer.finish()
    if config.router_drop_tks and config.router_capacity_factor_eval > 0:
        print(f"note: this checkpoint drops tokens over capacity at eval (router_capacity_factor_eval="
              f"{config.router_capacity_factor_eval}); Mixtral is dropless, so outputs match ours run dropless")
    print(f"exported {moe} as MixtralForCausalLM into {output} ({len(files)} shard(s))")
    if tok is None:
        print(no_tokenizer_note(output, moe, "--moe"))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("mixtral", help="llama_moe checkpoint (MoE in every layer) -> HF MixtralForCausalLM",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--moe", required=True, help="our llama_moe checkpoint directory")
    add_output_arguments(p, "HF Mixtral")
    add_tokenizer_argument(p, "--moe")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="output dtype; default: as stored")
    p.add_argument("--max_shard_size", default="2GB", help="largest safetensors shard (default 2GB)")
    p.set_defaults(func=_run)


def _run(args) -> None:
    if not os.path.isdir(args.moe):
        raise FileNotFoundError(f"--moe {args.moe} is not a directory")
    export_mixtral(args.moe, args.output, args.dtype, parse_size(args.max_shard_size), args.overwrite, args.tokenizer)
