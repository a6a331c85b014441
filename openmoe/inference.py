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


def shard_experts(model: OpenMoeForCausalLM, ep_group) -> None:
    """Expert-parallel serving: every rank keeps 1/ep of each MoE layer's experts (the EP layer slices in place)."""
    from openmoe.parallel.expert_parallel import ExpertParallelMoE

    for layer in model.model.layers:
        if layer.is_moe:
            layer.mlp = ExpertParallelMoE(layer.mlp, ep_group)
