"""Fixtures in the layout of the published OpenMoE checkpoints (OrionZheng/openmoe-*): `pytorch_model-*.bin` shards
with an index, the old config spelling with model_type "llama" and an auto_map naming upstream's code (which is not
shipped: we must not need it), and tokenizer files naming upstream's custom OpenMoeTokenizer beside its spiece.model.
`write_hub_cache` puts such a directory into an HF cache as a hub snapshot, for offline resolution."""

from __future__ import annotations

import json
import os
import shutil

import torch

UPSTREAM_AUTO_MAP = {"AutoConfig": "configuration_openmoe.OpenMoeConfig",
                     "AutoModelForCausalLM": "modeling_openmoe.OpenMoeForCausalLM"}
OLD_SPELLING = {"router_topk": "topk", "router_capacity_factor_train": "capacity_factor_train",
                "router_capacity_factor_eval": "capacity_factor_eval", "router_min_capacity": "min_capacity",
                "rms_norm_eps": "layer_norm_epsilon"}


def write_published_checkpoint(directory: str, model, sentencepiece_model: str | None) -> None:
    """`model`'s weights and config in the published layout; the tokenizer files when sentencepiece_model is given."""
    os.makedirs(directory, exist_ok=True)
    sd = model.state_dict()
    names = list(sd)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for fname, keys in shards.items():
        torch.save({k: sd[k].clone() for k in keys}, os.path.join(directory, fname))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    _write_json(os.path.join(directory, "pytorch_model.bin.index.json"), index)
    raw = {k: v for k, v in model.config.to_dict().items() if k not in ("auto_map", "transformers_version")}
    for new, old in OLD_SPELLING.items():
        raw[old] = raw.pop(new)
    raw.update(model_type="llama", auto_map=UPSTREAM_AUTO_MAP, rope_scaling=None, pretraining_tp=1)
    _write_json(os.path.join(directory, "config.json"), raw)
    if sentencepiece_model is not None:
        shutil.copyfile(sentencepiece_model, os.path.join(directory, "spiece.model"))
        _write_json(os.path.join(directory, "tokenizer_config.json"), {
            "tokenizer_class": "OpenMoeTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_openmoe.OpenMoeTokenizer", None]},
            "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"})


def write_hub_cache(hf_home: str, repo_id: str, source: str, commit: str = "0" * 40) -> str:
    """Copy `source` into HF_HOME's hub cache as the `main` snapshot of `repo_id`; returns the snapshot path."""
    repo = os.path.join(hf_home, "hub", "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", commit)
    shutil.copytree(source, snapshot)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    return snapshot


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
