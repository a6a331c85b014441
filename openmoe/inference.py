"""Inference helpers used by infer.py: loading for serving (one device, a device map with CPU/disk offload, or
experts sharded over ranks), batching prompts with left padding, and the OpenMoE-8B-Chat conventions.
"""

from __future__ import annotations

import os

import torch

from openmoe.config import ModelOptions, preset
from openmoe.data_formats import CHAT_SYSTEM, chat_prompt  # noqa: F401 (the template is shared with training)
from openmoe.io.hf import parse_dtype
from openmoe.model import OpenMoeForCausalLM


def chat_stop_sequences(tokenizer) -> list[list[int]]:
    """OpenMoE-8B-Chat often ends a reply by spelling `</s>` as ordinary pieces ("▁</", "s", ">") instead of the EOS
    token. Return those id sequences for this tokenizer (the umT5 pieces when present, else however the sentencepiece
    model spells the text "</s>")."""
    stops = []
    ids = tokenizer.convert_tokens_to_ids(["▁</", "s", ">"])
    if tokenizer.unk_token_id not in ids and None not in ids:
        stops.append(ids)
    sp = getattr(tokenizer, "sp_model", None)
    if sp is not None:
        for text in ("</s>", "a</s>"):  # after a space (dummy prefix "▁") and inside a word
            pieces = sp.encode(text)
            if text.startswith("a"):
                pieces = pieces[1:] if len(pieces) > 1 else pieces
            if pieces and pieces not in stops:
                stops.append(pieces)
    return stops


def encode_batch(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded [B, S] ids and mask, each row `<pad>`(BOS) + prompt, as in training."""
    from openmoe.data import encode

    rows = [encode(tokenizer, p, add_bos=True, add_eos=False) for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # pad id 0
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def check_dtype(dtype: str) -> torch.dtype:
    if dtype in ("fp16", "float16"):
        raise ValueError("--dtype fp16 is refused: OpenMoE was trained in bf16 and its activations overflow fp16 "
                         "(outputs degrade); use bf16 (GPU) or fp32 (CPU)")
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"--dtype '{dtype}' is not supported; accepted: bf16, fp32")
    return parse_dtype(dtype)


def load_model(model: str, dtype: torch.dtype, seed: int = 0, device_map: str | dict | None = None,
               max_memory: dict | None = None, offload_dir: str | None = None,
               options: ModelOptions | None = None) -> OpenMoeForCausalLM:
    """A checkpoint directory (ours or the published layout) or, for benchmarking, a preset with random weights.

    device_map ("auto" or {module: device}) places whole decoder layers over the visible GPUs, then CPU RAM, then
    disk beyond `max_memory` (transformers' from_pretrained with accelerate; a decoder layer is never split)."""
    if os.path.isdir(model):
        placement = {} if device_map is None else dict(device_map=device_map, max_memory=max_memory,
                                                        offload_folder=offload_dir)
        m = OpenMoeForCausalLM.from_pretrained(model, torch_dtype=dtype, options=options, **placement)
    elif os.path.sep in model or model.startswith("."):
        raise FileNotFoundError(f"checkpoint directory {model} does not exist")
    elif device_map is not None:
        raise ValueError(f"--device_map needs a checkpoint directory; '{model}' is a preset with random weights")
    else:
        torch.manual_seed(seed)
        m = OpenMoeForCausalLM(preset(model), options=options).to(dtype)
    return m.eval()


def input_device(model: OpenMoeForCausalLM) -> torch.device:
    """Where input ids go: the first accelerator a device map uses, else the CPU (offloaded layers run there)."""
    placed = getattr(model, "hf_device_map", None) or {"": next(model.parameters()).device}
    main = next((d for d in placed.values() if d not in ("cpu", "disk")), "cpu")
    return torch.device(f"cuda:{main}" if isinstance(main, int) else main)


def parse_max_memory(spec: str | None) -> dict | None:
    """'0=20GiB,1=20GiB,cpu=64GiB' -> {0: '20GiB', 1: '20GiB', 'cpu': '64GiB'}."""
    if not spec:
        return None
    out = {}
    for item in spec.split(","):
        if "=" not in item:
            raise ValueError(f"--max_memory entry '{item}' is not DEVICE=SIZE (e.g. 0=20GiB,cpu=64GiB)")
        key, size = item.split("=", 1)
        out[int(key) if key.strip().isdigit() else key.strip()] = size.strip()
    return out


def init_expert_parallel(ep_size: int, launch: str) -> tuple[int, int]:
    """Start the process group of an expert-parallel run launched by torchrun / colossalai run: NCCL with this
    process's GPU (LOCAL_RANK) as its device, gloo on CPU. Returns (rank, world size). `launch` is the command line to
    show when the process was not started by a launcher (no WORLD_SIZE), e.g. "torchrun --nproc_per_node 2 infer.py"."""
    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ:
        raise ValueError(f"--ep_size {ep_size} needs a distributed launch: {launch} ...")
    cuda = torch.cuda.is_available()
    if cuda:  # before the group starts, so that NCCL binds this rank's GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != ep_size:
        raise ValueError(f"--ep_size ({ep_size}) must equal the number of launched processes ({world})")
    return rank, world


def rank_rows(batch: int, rank: int, world: int) -> tuple[list[int], int]:
    """Rows of a batch that an expert-parallel rank decodes: r, r + W, ..., then row 0 again as dummy rows until
    every rank holds ceil(B / W) (a rank with no row of its own still steps: each MoE all-to-all needs all ranks).
    Equal row counts (and one prompt width for all ranks) keep every rank's token count equal, which capacity
    routing needs: its all-to-all splits are sized from the local token count. Returns (rows, how many are real)."""
    mine = list(range(rank, batch, world))
    return mine + [0] * (-(-batch // world) - len(mine)), len(mine)


def shard_experts(model: OpenMoeForCausalLM, ep_group) -> None:
    """Expert-parallel serving: every rank keeps 1/ep of each MoE layer's experts (the EP layer slices in place)."""
    from openmoe.parallel.expert_parallel import ExpertParallelMoE

    for layer in model.model.layers:
        if layer.is_moe:
            layer.mlp = ExpertParallelMoE(layer.mlp, ep_group)


# ------------------------------------------------------------------------------ model.generate on the fast decoder
# The GenerationConfig fields the fast route honours (greedy or sampling with temperature / top-k / top-p, repetition
# penalty, EOS ids, pad id, a suppressed vocabulary tail, a length). Any other field away from transformers' default
# (beams, min lengths, stop strings, n-gram bans, scores or dict outputs, ...) sends the call to transformers' generate.
FAST_GENERATE_FIELDS = frozenset({
    "max_length", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
    "eos_token_id", "pad_token_id", "bos_token_id", "suppress_tokens", "use_cache", "fast_decode",
    "_from_model_config", "transformers_version"})
# generate()'s own arguments that the fast route can honour only when unset (None, False or empty)
_UNSET_ONLY = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus", "assistant_model",
               "negative_prompt_ids", "negative_prompt_attention_mask")


def fast_generate(model, inputs, generation_config, kwargs: dict, options) -> torch.Tensor | None:
    """`model.generate(inputs, generation_config, **kwargs)` through the model's cached fast_decode.FastDecoder when
    the call is one it honours (fast_request), else None: the caller then runs transformers' generate. Same result
    contract as transformers': [B, S + n] ids, rows padded after their stop. The fast decoder routes dropless.
    options: True, or a dict of FastDecoder settings (compile: default on CUDA; moe_impl; sync_every)."""
    request = fast_request(model, inputs, generation_config, kwargs)
    if request is None:
        return None
    ids, streamer = request.pop("input_ids"), request.pop("streamer")
    settings = {"compile": ids.is_cuda, **(options if isinstance(options, dict) else {})}
    decoder = cached_decoder(model, ids.shape[0], ids.shape[1] + request["max_new_tokens"], **settings)
    return generate_streamed(decoder, ids, streamer, **request)


def generate_streamed(decoder, ids: torch.Tensor, streamer=None, **request) -> torch.Tensor:
    """decoder.generate(ids, **request), feeding a transformers-style streamer (put/end) in transformers' order: the
    prompt once, then each step's tokens, then end()."""
    on_tokens = None
    if streamer is not None:
        streamer.put(ids.cpu())
        on_tokens = lambda tokens, finished: streamer.put(tokens.cpu())  # noqa: E731
    out = decoder.generate(ids, on_tokens=on_tokens, **request)
    if streamer is not None:
        streamer.end()
    return out


def fast_request(model, inputs, generation_config, kwargs: dict) -> dict | None:
    """FastDecoder.generate's arguments (plus input_ids and streamer) for a model.generate call, or None when the
    model or the call is one the fast decoder cannot run exactly: an exported copy of the model code (no openmoe
    classes), a device map or several devices, expert-parallel layers, logits processors, stopping criteria, synced
    GPUs, extra model inputs, or a generation field outside FAST_GENERATE_FIELDS. The generation config is merged by
    transformers' own _prepare_generation_config (kwargs > the given config > the model's), as generate does."""
    from transformers import GenerationConfig

    prepare = getattr(model, "_prepare_generation_config", None)
    if not runs_fast(model) or prepare is None:  # no prepare: a transformers whose merge we cannot reproduce
        return None
    kwargs = dict(kwargs)
    ids = kwargs.pop("input_ids", None) if inputs is None else inputs
    mask, streamer = kwargs.pop("attention_mask", None), kwargs.pop("streamer", None)
    for name in _UNSET_ONLY:
        value = kwargs.pop(name, None)
        if not (value is None or value is False or (isinstance(value, (list, tuple)) and not value)):
            return None
    if not torch.is_tensor(ids) or ids.dim() != 2 or ids.is_floating_point() or ids.shape[1] == 0:
        return None
    config, model_kwargs = prepare(generation_config, **kwargs)
    if model_kwargs:  # inputs transformers would hand to the model (inputs_embeds, position_ids, a cache, ...)
        return None
    default = GenerationConfig().to_dict()
    if any(v != default.get(k) for k, v in config.to_dict().items() if k not in FAST_GENERATE_FIELDS):
        return None
    n = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - ids.shape[1]
    eos = eos_ids(config.eos_token_id)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
    if n < 1 or (eos and pad != model.config.pad_token_id):  # the fast decoder pads with the config's pad id
        return None
    if config.do_sample and (not config.temperature or config.temperature <= 0 or (config.top_k or 0) < 0
                             or not 0 < config.top_p <= 1):
        return None  # transformers' generate names the bad value
    if config.repetition_penalty is None or config.repetition_penalty <= 0:
        return None
    vocab_limit = None
    if config.suppress_tokens:  # only a suppressed tail of the vocabulary (the padded embedding rows) is honoured
        vocab_limit = min(int(t) for t in config.suppress_tokens)
        if sorted(set(int(t) for t in config.suppress_tokens)) != list(range(vocab_limit, model.config.vocab_size)):
            return None
    if mask is None:
        mask = transformers_default_mask(ids, pad, eos)
    return dict(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=bool(config.do_sample),
                temperature=float(config.temperature), top_k=int(config.top_k or 0), top_p=float(config.top_p),
                repetition_penalty=float(config.repetition_penalty), eos_token_id=eos[0] if eos else -1,
                stop_sequences=[[e] for e in eos[1:]], vocab_limit=vocab_limit, streamer=streamer)


def runs_fast(model) -> bool:
    """The fast decoder runs this model: openmoe's own classes (not an exported copy of the code), one device, no
    device map, no expert-parallel layers."""
    from openmoe.moe import OpenMoeSparseMLP

    if not isinstance(model, OpenMoeForCausalLM) or getattr(model, "hf_device_map", None):
        return False
    if len({p.device for p in model.parameters()}) != 1:
        return False
    return all(isinstance(layer.mlp, OpenMoeSparseMLP) for layer in model.model.layers if layer.is_moe)


def eos_ids(eos) -> list[int]:
    """A generation config's eos_token_id (None, an id, a list or a tensor of ids: any of them stops a row)."""
    if eos is None:
        return []
    if isinstance(eos, int):
        return [eos]
    return [int(e) for e in (eos.tolist() if torch.is_tensor(eos) else eos)]


def transformers_default_mask(ids: torch.Tensor, pad: int | None, eos: list[int]) -> torch.Tensor:
    """The attention mask transformers' generate builds when none is given: ids != pad where the pad id occurs in
    ids and is not an EOS id, else all ones (the fast decoder then shows the <pad>-BOS, as the model does)."""
    if pad is not None and bool((ids == pad).any()) and pad not in eos:
        return (ids != pad).long()
    return torch.ones_like(ids)


def cached_decoder(model, batch_size: int, seq_len: int, compile: bool = False, moe_impl: str = "auto",
                   sync_every: int = 8):
    """The model's fast_decode.FastDecoder, kept on the model and reused while requests fit; rebuilt, larger, when
    one does not (batch or length), or when the model moved, changed dtype, or the settings differ. The static
    cache's length is the request's rounded up to a power of two (at most max_position_embeddings, never below the
    request) so that growing prompts rebuild it rarely; every decode step attends over all of its columns."""
    from openmoe.fast_decode import FastDecoder

    weight = model.lm_head.weight
    key = (weight.device, weight.dtype, compile, moe_impl, sync_every)
    held = model.__dict__.get("_openmoe_fast_decoder")
    if held is not None and held[0] == key:
        decoder = held[1]
        if batch_size <= decoder.max_batch_size and seq_len <= decoder.max_seq_len:
            return decoder
        batch_size, seq_len = max(batch_size, decoder.max_batch_size), max(seq_len, decoder.max_seq_len)
    limit = model.config.max_position_embeddings
    length = max(seq_len, min(limit, 1 << (seq_len - 1).bit_length()))
    model.__dict__["_openmoe_fast_decoder"] = None  # free the old cache before allocating the new one
    decoder = FastDecoder(model, batch_size, length, moe_impl=moe_impl, compile=compile, sync_every=sync_every)
    model.__dict__["_openmoe_fast_decoder"] = (key, decoder)
    return decoder
