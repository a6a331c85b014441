"""Inference helpers used by infer.py: loading for serving (one device, a device map with CPU/disk offload, or
experts sharded over ranks), batching prompts with left padding, and the OpenMoE-8B-Chat conventions.
"""

from __future__ import annotations

import os

import torch

from openmoe.io.hf import parse_dtype
from openmoe.config import preset
from openmoe.data_formats import CHAT_SYSTEM, chat_prompt  # noqa: F401 (the template is shared with training)
from openmoe.model import OpenMoeForCausalLM
from openmoe.moe import OpenMoeSparseMLP


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


def load_model(model: str, dtype: torch.dtype, seed: int = 0) -> OpenMoeForCausalLM:
    """A checkpoint directory (ours or the published layout) or, for benchmarking, a preset with random weights."""
    if os.path.isdir(model):
        m = OpenMoeForCausalLM.from_pretrained(model, torch_dtype=dtype)
    elif os.path.sep in model or model.startswith("."):
        raise FileNotFoundError(f"checkpoint directory {model} does not exist")
    else:
        torch.manual_seed(seed)
        m = OpenMoeForCausalLM(preset(model)).to(dtype)
    return m.eval()


def set_dropless(model: OpenMoeForCausalLM) -> None:
    """Route every token: no capacity drops, so outputs do not depend on what else is in the batch (costs a
    device->host sync per MoE layer to size the buffers). Shorthand for ModelOptions(dropless=True)."""
    model.apply_options(model.options.replace(dropless=True))


def dispatch(model: OpenMoeForCausalLM, device_map: str | dict, max_memory: dict | None, offload_dir: str | None
             ) -> tuple[OpenMoeForCausalLM, torch.device]:
    """Place whole decoder layers over the visible devices (HF accelerate conventions), offloading to CPU RAM and
    then disk beyond `max_memory`. A decoder layer is never split."""
    from accelerate import dispatch_model, infer_auto_device_map

    if device_map == "auto":
        device_map = infer_auto_device_map(model, max_memory=max_memory,
                                           no_split_module_classes=["OpenMoeDecoderLayer"],
                                           dtype=next(model.parameters()).dtype)
    if "disk" in device_map.values() and offload_dir is None:
        raise ValueError("the device map offloads to disk: pass --offload_dir DIR")
    main = next((d for d in device_map.values() if d not in ("cpu", "disk")), "cpu")
    model = dispatch_model(model, device_map=device_map, main_device=main, offload_dir=offload_dir)
    return model, torch.device(f"cuda:{main}" if isinstance(main, int) else main)  # where inputs go


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


def shard_experts(model: OpenMoeForCausalLM, ep_group) -> None:
    """Expert-parallel serving: every rank keeps 1/ep of each MoE layer's experts (the EP layer slices in place)."""
    from openmoe.parallel.expert_parallel import ExpertParallelMoE

    for layer in model.model.layers:
        if layer.is_moe:
            layer.mlp = ExpertParallelMoE(layer.mlp, ep_group)
