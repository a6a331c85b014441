"""LoRA fine-tuning (--lora_rank R): PEFT's LoRA layers injected into the single-device model before expert-parallel
wrapping, on the attention and dense MLP projections (the experts, the router and everything else stay frozen: they
get no fp32 master copy and no Adam moments). The model stays an OpenMoeForCausalLM, so the shardformer policy,
pipeline stages and checkpoints work as without LoRA; its state dict then names a targeted weight
`...q_proj.base_layer.weight` and its adapter `...q_proj.lora_A.default.weight` / `lora_B`.

Exports: `adapter_state_dict` turns a full state dict into a PEFT adapter (`PeftModel.from_pretrained(base, dir)`
loads it on one device); `merged_state_dict` folds W + (alpha / r) * B @ A into the published key layout (what
--merge_lora writes as the HF model).
"""

from __future__ import annotations

import torch

from openmoe.train.trainer import StepHook

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER = "default"  # PEFT's adapter name inside the model


def lora_config(run, base: str | None = None):
    """PEFT's config for the run's adapters. base: the model they adapt (--pretrained); a local directory is recorded
    as an absolute path, so that AutoPeftModel finds it from any working directory (a hub id stays as given)."""
    import os

    from peft import LoraConfig

    if base is not None and os.path.isdir(base):
        base = os.path.abspath(base)
    lo = run.lora
    targets = list(lo.lora_targets.split(",")) if lo.lora_targets else list(DEFAULT_TARGETS)
    return LoraConfig(r=lo.lora_rank, lora_alpha=lo.lora_alpha if lo.lora_alpha is not None else 2 * lo.lora_rank,
                      lora_dropout=lo.lora_dropout, target_modules=targets, bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=base)


def apply_lora(model: torch.nn.Module, run) -> None:
    """Inject the adapters (B = 0: the model computes what it did) and freeze every other parameter."""
    from peft import inject_adapter_in_model

    config = lora_config(run)
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = sorted(set(config.target_modules) - names)
    if unknown:
        raise ValueError(f"--lora_targets {sorted(config.target_modules)}: {unknown} name no linear layer of this "
                         f"model; accepted: {sorted(names - {'lm_head'})}")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)


def is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def adapter_state_dict(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's on-disk naming: `base_model.model.<module>.lora_A.weight` (adapter name dropped)."""
    return {"base_model.model." + k.replace(f".{ADAPTER}.", "."): v for k, v in full.items() if is_lora_key(k)}


def merged_state_dict(full: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The published key layout with every adapter folded into its base weight: W + (alpha / r) * B @ A, computed
    in fp32 and stored in W's dtype."""
    scale = config.lora_alpha / config.r
    out = {}
    for key, w in full.items():
        if is_lora_key(key):
            continue
        if ".base_layer." in key:
            module = key.split(".base_layer.")[0]
            a, b = full[f"{module}.lora_A.{ADAPTER}.weight"], full[f"{module}.lora_B.{ADAPTER}.weight"]
            w = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
            key = key.replace(".base_layer.", ".")
        out[key] = w
    return out


def save_adapter(directory: str, full: dict[str, torch.Tensor], config) -> None:
    """A PEFT adapter directory (adapter_config.json + adapter_model.safetensors), written atomically."""
    from safetensors.torch import save_file

    from openmoe.io.hf import atomic_directory

    with atomic_directory(directory) as tmp:
        config.save_pretrained(tmp)
        tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(full).items()}
        save_file(tensors, f"{tmp}/adapter_model.safetensors", metadata={"format": "pt"})


def lora_tensors(model) -> dict[str, torch.Tensor] | None:
    """The adapters of a boosted model in the single-device layout, on global rank 0 (None elsewhere). Collective;
    gathers only the adapter tensors (with a pipeline, from every stage)."""
    from openmoe.parallel.gather import gather_full

    return gather_full(model, {k: v for k, v in model.unwrap().state_dict().items() if is_lora_key(k)})


def export_lora(state, output_path: str) -> list[str]:
    """After training: `adapter/` (PEFT) always, and with --merge_lora the merged model in HF format under `hf/`
    (with the tokenizer). Collective; returns the directories written."""
    import os

    import torch.distributed as dist

    from openmoe.io.hf import write_checkpoint
    from openmoe.parallel.gather import full_state_dict

    config = lora_config(state.run, base=state.run.model.pretrained)
    full = full_state_dict(state.model) if state.run.lora.merge_lora else lora_tensors(state.model)
    written = [os.path.join(output_path, "adapter")]
    if full is not None:
        save_adapter(written[0], full, config)
        if state.run.lora.merge_lora:
            write_checkpoint(os.path.join(output_path, "hf"), state.cfg, merged_state_dict(full, config),
                             tokenizer=state.tokenizer)
    if state.run.lora.merge_lora:
        written.append(os.path.join(output_path, "hf"))
    if full is not None:  # the rank that wrote: the final checkpoint's rotation may have left an adapter orphaned
        prune_adapters(output_path)
    dist.barrier()
    return written


class AdapterSaver(StepHook):
    """A PEFT adapter directory `adapters/step-N/` beside every resumable checkpoint (--save_interval)."""

    def after_step(self, trainer, result) -> None:
        import os

        state, interval = trainer.state, trainer.state.run.checkpoint.save_interval
        if result.applied and interval and result.step % interval == 0 and result.step != state.total_steps:
            tensors = lora_tensors(state.model)
            if tensors is not None:
                out = state.run.checkpoint.output_path
                save_adapter(os.path.join(out, "adapters", f"step-{result.step:08d}"),
                             tensors, lora_config(state.run, base=state.run.model.pretrained))
                prune_adapters(out, keep=result.step)


def prune_adapters(output_path: str, keep: int | None = None) -> list[str]:
    """Rotate `adapters/step-N/` with the checkpoints: remove each whose `checkpoints/step-N` no longer exists
    (--keep_last rotated it away), except step `keep` (just written; its checkpoint may be saved after it). Returns
    the directories removed."""
    import os
    import shutil

    from openmoe.io.resumable import CheckpointManager

    root = os.path.join(output_path, "adapters")
    if not os.path.isdir(root):
        return []
    kept = {os.path.basename(d) for d in CheckpointManager(os.path.join(output_path, "checkpoints"), 1).complete()}
    if keep is not None:
        kept.add(f"step-{keep:08d}")
    removed = [os.path.join(root, d) for d in sorted(os.listdir(root)) if d.startswith("step-") and d not in kept]
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed
