"""Training building blocks used by train.py: distributed setup, model/data/optimizer construction, the step,
metrics reduction, resumable checkpoints and the HF-format export. Colossalai is imported here, never in the model.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
import zlib
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from openmoe.io.hf import check_state_dict, read_tensors, write_checkpoint
from openmoe.config import OpenMoeConfig, preset
from openmoe.finetune import trainable_parameters
from openmoe.model import OpenMoeForCausalLM
from openmoe.moe import HAS_GROUPED_MM, OpenMoeSparseMLP
from openmoe.parallel.expert_parallel import ExpertParallelMoE
from openmoe.parallel.load_balance import BiasBalancer, ExpertPlacement, LayerRebalance, apply_placement, rebalance
from openmoe.run_config import TrainConfig

MANIFEST = "manifest.json"
PLACEMENT = "expert_placement.pt"  # --load_balance: which expert each physical slot holds (ExpertPlacement)


class TrainingStopped(RuntimeError):
    """A run ended on purpose (e.g. too many non-finite steps): reported as one line, no traceback."""  # written last: a checkpoint directory without it is incomplete


# ---------------------------------------------------------------- setup
def check_gpus_per_node(local_world_size: int, gpus: int) -> None:
    """More processes per node than GPUs would share devices (and NCCL refuses); say so before launching."""
    if gpus and local_world_size > gpus:
        raise ValueError(f"--nproc_per_node {local_world_size} exceeds the {gpus} GPU(s) on this node; accepted: at "
                         f"most {gpus}")


def init_distributed(seed: int) -> tuple[int, int, torch.device]:
    import colossalai
    from colossalai.accelerator import get_accelerator

    from openmoe.parallel.cpu_compat import apply_cpu_patches

    apply_cpu_patches()  # no-op with CUDA
    if torch.cuda.is_available():
        check_gpus_per_node(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count())
    colossalai.launch_from_torch(seed=seed, verbose=False)
    # Collectives on CPU (gloo) and GPU (NCCL) give up after this long instead of hanging forever.
    return dist.get_rank(), dist.get_world_size(), get_accelerator().get_current_device()


def model_config(run: TrainConfig) -> OpenMoeConfig:
    source = run.pretrained or run.model_name
    cfg = OpenMoeConfig.load(source) if os.path.isdir(source) else preset(source)
    overrides = {k: getattr(run, k) for k in ("router_aux_loss_factor", "router_z_loss_factor", "label_smoothing",
                                              "z_loss_factor", "router_aux_loss_type", "num_shared_experts")
                 if getattr(run, k) is not None}
    cfg = cfg.replace(**overrides) if overrides else cfg
    if run.max_length > cfg.max_position_embeddings:
        raise ValueError(f"--max_length ({run.max_length}) exceeds the model's max_position_embeddings "
                         f"({cfg.max_position_embeddings})")
    return cfg


def check_output_path(path: str) -> None:
    """Fail before training, not at the first save."""
    probe = os.path.join(path, f".write-test-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--output_path {path} is not writable: {e.strerror}") from None


def build_model(run: TrainConfig, cfg: OpenMoeConfig) -> OpenMoeForCausalLM:
    """Full model on every rank, same seed everywhere (dense replicas agree; the EP policy slices experts)."""
    torch.manual_seed(run.seed)
    if run.pretrained:
        model = OpenMoeForCausalLM.from_pretrained(run.pretrained)
        model.config = cfg  # run overrides of the loss factors
    else:
        model = OpenMoeForCausalLM(cfg)
    if run.use_kernel:
        if not HAS_GROUPED_MM:
            raise ValueError(f"--use_kernel needs torch._grouped_mm, which torch {torch.__version__} lacks")
        for m in model.modules():
            if isinstance(m, OpenMoeSparseMLP):
                m.expert_impl = "grouped"
    model.model.gradient_checkpointing = run.activation_checkpointing
    model.model.checkpoint_policy = run.ac_policy
    model.lm_loss_impl = run.lm_loss_impl
    if run.use_layernorm_kernel:
        from openmoe.kernels import use_fused_rmsnorm

        use_fused_rmsnorm(model)
    # frozen parameters get requires_grad False before the optimizer exists, so they never get optimizer state
    trainable_parameters(model, run.trainable, run.freeze_router)
    if run.dropless:
        for m in model.modules():
            if isinstance(m, OpenMoeSparseMLP):
                m.capacity_factor_train = m.capacity_factor_eval = 0.0
    return model


def build_data(run: TrainConfig, cfg: OpenMoeConfig, dp_rank: int, dp_size: int):
    from openmoe import data

    tokenizer = data.load_tokenizer(run.tokenizer)
    data.check_vocab(tokenizer, cfg.vocab_size)
    records = data.load_records(run.dataset, run.task_name, run.split)
    data.check_fields(records, [run.prompt_field, run.completion_field])
    examples = data.tokenize_examples(records, tokenizer, run.max_length, prompt_field=run.prompt_field,
                                      completion_field=run.completion_field, mask_prompt=run.mask_prompt)
    if run.pack:
        examples = data.pack_examples(examples, run.max_length)
    # Fixed [B, max_length] shapes: every EP rank then computes the same capacity, so all-to-all splits are equal.
    batches = data.ShardedBatches(examples, run.batch_size, dp_rank, dp_size, seed=run.seed,
                                  pad_id=cfg.pad_token_id, max_length=run.max_length)
    return tokenizer, batches


def lr_lambda(run: TrainConfig, total_steps: int):
    def f(step: int) -> float:
        if step < run.warmup_steps:
            return (step + 1) / run.warmup_steps
        if run.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - run.warmup_steps) / max(1, total_steps - run.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if run.lr_schedule == "cosine" else 1 - progress
        return run.min_lr_ratio + (1 - run.min_lr_ratio) * shape

    return f


def build_optimizer(run: TrainConfig, model: torch.nn.Module, total_steps: int):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]  # norms
    # fused: one kernel per parameter group for the whole update (measured on an H200 at 5.5B parameters: the
    # default foreach AdamW took ~100 ms a step, more than the forward+backward matmuls of 8k tokens)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": run.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=run.lr, betas=(0.9, 0.95), fused=True)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(run, total_steps))


# ---------------------------------------------------------------- step and metrics
@dataclass
class StepStats:
    loss: float
    ce_loss: float
    z_loss: float
    aux_loss: float
    router_z_loss: float
    tokens: int
    tokens_per_expert: list  # [moe layers][E], summed over ranks
    dropped_fraction: float


def reduce_stats(outs, cfg: OpenMoeConfig, device, placement: ExpertPlacement | None = None) -> StepStats:
    """Average loss parts over the ranks that hold outputs, sum token counts over them. One all-reduce per logged step.
    With a placement (--load_balance) the per-expert counts are reported per logical expert, not per physical slot.

    Without a pipeline every rank holds outputs; with one only the last stage does (its outputs carry every MoE
    layer's statistics, see openmoe/parallel/pipeline.py), and the other ranks contribute zeros and are not counted.
    """
    parts = ("loss", "ce_loss", "z_loss", "aux_loss", "router_z_loss")
    n, moe_shape = len(parts), (cfg.num_moe_layers, cfg.num_experts)
    flat = torch.zeros(n + 2 + moe_shape[0] * moe_shape[1] + 1, dtype=torch.float64)
    if outs:
        flat[:n] = torch.tensor([[getattr(o, p).item() for p in parts] for o in outs], dtype=torch.float64).mean(0)
        flat[n] = float(sum(int(o.num_tokens) for o in outs))
        flat[n + 1] = 1.0  # this rank counts
        moe = torch.stack([torch.stack([m.tokens_per_expert.double().cpu() for m in o.moe]) for o in outs]).sum(0)
        flat[n + 2:-1] = moe.flatten()  # [num_moe_layers * E]
        flat[-1] = float(np.mean([float(m.dropped_fraction) for o in outs for m in o.moe]))
    flat = flat.to(device)
    dist.all_reduce(flat)
    ranks = flat[n + 1].item()
    per_expert = flat[n + 2:-1].view(moe_shape).long().cpu()
    if placement is not None:
        per_expert = torch.stack([placement.to_logical(c, layer) for layer, c in enumerate(per_expert)])
    return StepStats(*(flat[:n] / ranks).tolist(), tokens=int(flat[n].item()),
                     tokens_per_expert=per_expert.tolist(),
                     dropped_fraction=float(flat[-1].item() / ranks))


def forward_backward(model, booster, optimizer, batches: list[dict], poison: bool = False) -> list:
    """Loss and gradients of the mean loss over `batches` (gradient accumulation); returns the outputs this rank
    holds (all of them, or with a pipeline the last stage's per-micro-batch outputs). poison: fault injection for
    tests (OPENMOE_FAULT_NAN_STEPS), makes the loss NaN.

    With ZeRO-1 the gradients are reduced once per step, after the last micro-batch: the earlier ones run under the
    optimizer's no_sync(), so autograd sums them in p.grad and ZeRO's bucket copies, data-parallel all-reduces and
    grad-store adds (several passes over every gradient) happen once per step instead of once per micro-batch.
    ZeRO-2 reduce-scatters each micro-batch's gradients to free them (its point), so it keeps reducing every
    micro-batch; ColossalAI refuses no_sync there.
    """
    if booster.plugin.stage_manager is not None:
        return _pipeline_forward_backward(model, booster, optimizer, batches, poison)
    defer = len(batches) > 1 and defers_reduction(optimizer)
    outs = []
    for i, batch in enumerate(batches):
        hold = optimizer.no_sync() if defer and i < len(batches) - 1 else nullcontext()
        with hold:
            with torch.profiler.record_function("openmoe.forward"):
                out = model(**batch)
            if poison:
                out.loss = out.loss * float("nan")
            with torch.profiler.record_function("openmoe.backward"):
                booster.backward(out.loss / len(batches), optimizer)
        outs.append(out)
    return outs


def defers_reduction(optimizer) -> bool:
    """Whether `optimizer` is a ZeRO-1 optimizer that can hold gradient reduction back (colossalai's no_sync)."""
    return getattr(optimizer, "_partition_grads", True) is False and hasattr(optimizer, "no_sync")


def _pipeline_forward_backward(model, booster, optimizer, batches: list[dict], poison: bool = False) -> list:
    """One 1F1B pass over the batches concatenated: its micro-batches replace gradient accumulation (the schedule
    averages the micro-batch losses; the plugin was built for exactly this many, see plugins.resolve_sizes)."""
    from openmoe.parallel.pipeline import detached

    batch = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    outs = []

    def criterion(out, micro_batch):  # last stage only, once per micro-batch
        if poison:
            out.loss = out.loss * float("nan")
        outs.append(detached(out))
        return out.loss

    booster.execute_pipeline(iter([batch]), model, criterion, optimizer, return_loss=False)
    return outs


def local_gradients(model, optimizer) -> list[torch.Tensor]:
    """This rank's gradients after backward: ZeRO keeps the reduced ones in its stores (p.grad is cleared)."""
    if hasattr(optimizer, "get_working_grads_by_group_id"):
        return [g for gid in range(optimizer.num_param_groups) for g in optimizer.get_working_grads_by_group_id(gid)]
    return [p.grad for p in model.parameters() if p.grad is not None]


def train_step(model, booster, optimizer, batches_iter, grad_accum: int, device, poison: bool = False,
               check_grads: bool = False, poison_grad: bool = False):
    """One optimizer step; returns (outputs, applied). A step whose loss (or, with check_grads, any local gradient)
    is not finite on some rank is skipped on every rank: gradients dropped, weights and optimizer state unchanged.

    check_grads is for bf16: ZeRO's backward has already reduced the gradients into this rank's partitions; a
    non-finite value anywhere shows up in some rank's partition, and the flag is all-reduced. fp16 leaves gradient
    overflow to its loss scaler, which skips such steps itself. poison_grad: fault injection for tests (OPENMOE_FAULT_NAN_GRAD_STEPS).
    """
    batches = to_device([next(batches_iter) for _ in range(grad_accum)], device)
    outs = forward_backward(model, booster, optimizer, batches, poison)
    grads = local_gradients(model, optimizer)
    if poison_grad and grads:
        grads[0].view(-1)[0] = float("nan")
    with torch.profiler.record_function("openmoe.grad_check"):
        ok = all(torch.isfinite(o.loss).all() for o in outs)
        if check_grads and grads:
            # a NaN/inf anywhere; the fp32 upcast happens inside the norm kernel (no fp32 copy of the gradients)
            norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])
            ok = ok and bool(norms.isfinite().all())
        finite = torch.tensor([float(ok)], device=device)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # one flag: ranks without outputs (pipeline) vote 1
        applied = bool(finite.item())
    with torch.profiler.record_function("openmoe.optimizer_step"):
        if applied:
            optimizer.step()
        optimizer.zero_grad()
    return outs, applied


def to_device(batches: list[dict], device) -> list[dict]:
    """The step's CPU batches on the device. An attention mask of all ones (packed or unpadded rows) is dropped
    while still on the CPU (no device sync): without it the model runs plain causal attention (SDPA's flash kernel;
    an explicit mask forces a slower masked kernel), routes every token and counts positions from 0, which is
    exactly what the all-ones mask meant. Dropped for all of the step's batches or none (pipeline micro-batches must
    carry the same keys)."""
    if all("attention_mask" in b and bool(b["attention_mask"].all()) for b in batches):
        batches = [{k: v for k, v in b.items() if k != "attention_mask"} for b in batches]
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


# ---------------------------------------------------------------- checkpoints
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_root(run: TrainConfig) -> str:
    return os.path.join(run.output_path, "checkpoints")


def _master_params(optimizer) -> list[torch.Tensor]:
    """The fp32 master tensors this rank's optimizer updates (ZeRO: this rank's shard of every parameter)."""
    return [p for group in optimizer.optim.param_groups for p in group["params"]]


def save_resumable(model, optimizer, scheduler, cfg: OpenMoeConfig, run: TrainConfig, step: int,
                   data_state: dict, balancer: BiasBalancer | None = None,
                   placement: ExpertPlacement | None = None) -> str:
    """Resumable checkpoint: the model in HF format (experts gathered; what from_pretrained loads), each rank's
    fp32 master shard and optimizer moments, the LR schedule, every rank's RNG, step and data position, the
    router balancing biases when --balance_mode bias, and the expert placement when --load_balance. The model and
    the biases are written in the logical (published) expert order, the per-rank optimizer files in the physical
    one (see ExpertPlacement).

    All ranks write into `step-N.tmp`; rank 0 writes the manifest last and renames the directory into place, so a
    save killed halfway leaves only a `.tmp` directory that resume ignores.
    """
    rank = dist.get_rank()
    root = checkpoint_root(run)
    final = os.path.join(root, f"step-{step:08d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    sd = full_state_dict(model, placement)
    if rank == 0:
        write_checkpoint(os.path.join(tmp, "model"), cfg, sd)
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
    scaler = getattr(getattr(optimizer, "mixed_precision_mixin", None), "grad_scaler", None)  # fp16 only
    torch.save({"optim": optimizer.optim.state_dict(), "masters": [p.detach().cpu() for p in _master_params(optimizer)],
                "grad_scaler": scaler.state_dict() if scaler is not None else None},
               os.path.join(tmp, f"optimizer-rank{rank:05d}.pt"))
    torch.save(rng_state(), os.path.join(tmp, f"rng-rank{rank:05d}.pt"))
    if balancer is not None and rank == 0:  # identical on every rank: updated from all-reduced counts
        torch.save(logical_bias_state(balancer, placement), os.path.join(tmp, "router_bias.pt"))
    if placement is not None and rank == 0:  # identical on every rank: planned from all-reduced counts
        torch.save(placement.state_dict(), os.path.join(tmp, PLACEMENT))
    dist.barrier()
    if rank == 0:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step, "data": data_state, "world_size": dist.get_world_size(),
                       "run": run.to_dict()}, f, indent=2)
        files = {}
        for dirpath, _, names in os.walk(tmp):
            for name in names:
                full = os.path.join(dirpath, name)
                with open(full, "rb") as fh:
                    os.fsync(fh.fileno())
                files[os.path.relpath(full, tmp)] = {"size": os.path.getsize(full), "crc32": file_crc32(full)}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({"step": step, "files": files}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        rotate(root, run.keep_last)
    dist.barrier()
    return final


def ep_layer_lookup(module: torch.nn.Module):
    """key -> the ExpertParallelMoE whose sharded experts hold that state-dict key, or None."""
    prefixes = {name + ".experts.": m for name, m in module.named_modules() if isinstance(m, ExpertParallelMoE)}
    return lambda key: next((m for p, m in prefixes.items() if key.startswith(p)), None)


def load_model_weights(module: torch.nn.Module, directory: str) -> None:
    """Copy an HF-format checkpoint into a (possibly expert-parallel, pipelined) model: each EP rank reads only its
    experts, each pipeline stage only the parameters it holds."""
    ep_layer = ep_layer_lookup(module)
    unheld = unheld_parameters(module)

    def select(key):
        if key in unheld:
            return False
        layer = ep_layer(key)
        return layer.expert_slice if layer is not None else None

    tensors = read_tensors(directory, select)
    params = module.state_dict(keep_vars=True)
    check_state_dict({k: v.shape for k, v in params.items()}, tensors, directory)
    with torch.no_grad():
        for key, p in params.items():
            p.data.copy_(tensors[key])


def unheld_parameters(module: torch.nn.Module) -> set[str]:
    """Names of the parameters another pipeline stage holds (ColossalAI sets them to None on this one)."""
    return {f"{name}.{p}" if name else p for name, m in module.named_modules()
            for p, v in m._parameters.items() if v is None}


def file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def verify_checkpoint(path: str) -> str | None:
    """None when every file the manifest lists is present with its size and CRC-32; else what is wrong."""
    with open(os.path.join(path, MANIFEST)) as f:
        files = json.load(f)["files"]
    for rel, meta in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{full} is missing"
        size = os.path.getsize(full)
        if size != meta["size"]:
            return f"{full} has {size} bytes, its manifest says {meta['size']} (truncated or overwritten)"
        if file_crc32(full) != meta["crc32"]:
            return f"{full} fails its CRC-32 check (corrupted)"
    return None


def newest_usable_checkpoint(root: str) -> str | None:
    """Rank 0 checks the complete checkpoints newest first and falls back past corrupt ones with a warning; the
    choice is broadcast so that every rank loads the same one."""
    candidates = complete_checkpoints(root)[::-1]
    choice = [None]
    if dist.get_rank() == 0:
        for path in candidates:
            problem = verify_checkpoint(path)
            if problem is None:
                choice[0] = path
                break
            print(f"warning: checkpoint {path} is unusable: {problem}; trying the previous one", file=sys.stderr,
                  flush=True)
    dist.broadcast_object_list(choice, src=0)
    if choice[0] is None and candidates:
        raise ValueError(f"none of the {len(candidates)} checkpoints under {root} is usable (see the warnings)")
    return choice[0]


def complete_checkpoints(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    dirs = [os.path.join(root, d) for d in sorted(os.listdir(root)) if d.startswith("step-") and not d.endswith(".tmp")]
    return [d for d in dirs if os.path.isfile(os.path.join(d, MANIFEST))]


def rotate(root: str, keep_last: int) -> None:
    done = complete_checkpoints(root)
    for old in done[: max(0, len(done) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)


def load_resumable(model, optimizer, scheduler, run: TrainConfig, balancer: BiasBalancer | None = None,
                   placement: ExpertPlacement | None = None) -> tuple[int, dict, str] | None:
    """Restore the newest usable checkpoint. The model is loaded in the identity layout (each EP rank its contiguous
    experts), then, with --load_balance, moved into the saved expert placement; the optimizer files are physical."""
    path = newest_usable_checkpoint(checkpoint_root(run))
    if path is None:
        return None
    rank = dist.get_rank()
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    if state["world_size"] != dist.get_world_size():
        raise ValueError(f"checkpoint {path} was written by {state['world_size']} ranks; this run has "
                         f"{dist.get_world_size()} (resume needs the same parallel layout)")
    load_model_weights(model.unwrap(), os.path.join(path, "model"))
    saved = torch.load(os.path.join(path, f"optimizer-rank{rank:05d}.pt"), weights_only=False)
    with torch.no_grad():
        for p, m in zip(_master_params(optimizer), saved["masters"], strict=True):
            p.copy_(m)
    optimizer.optim.load_state_dict(saved["optim"])
    if saved["grad_scaler"] is not None:
        optimizer.mixed_precision_mixin.grad_scaler.load_state_dict(saved["grad_scaler"])
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=False))
    set_rng_state(torch.load(os.path.join(path, f"rng-rank{rank:05d}.pt"), weights_only=False))
    if balancer is not None:
        bias_file = os.path.join(path, "router_bias.pt")
        if not os.path.isfile(bias_file):
            raise ValueError(f"--balance_mode bias: checkpoint {path} holds no router biases (it was trained without "
                             "bias balancing)")
        balancer.load_state_dict(torch.load(bias_file, map_location="cpu"))  # logical order
    placement_file = os.path.join(path, PLACEMENT)
    if os.path.isfile(placement_file):
        if placement is None:
            raise ValueError(f"checkpoint {path} was trained with --load_balance (its experts moved between ranks); "
                             "resume it with --load_balance (any --load_balance_interval)")
        placement.load_state_dict(torch.load(placement_file, map_location="cpu"))
    elif placement is not None:
        placement.reset()  # a checkpoint without a placement file: the identity placement
    if placement is not None:
        apply_placement(moe_layers(model), placement)  # weights, router rows, selection biases
    return state["step"], state["data"], path


def gather_experts(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate EP-sharded expert tensors (keyed like module.state_dict()) into full [E, ...] tensors, on CPU.

    Collective over every EP group: the ranks of one group must call it with the same keys (they hold the same stage).
    """
    ep_layer = ep_layer_lookup(module)
    out = {}
    for key, t in tensors.items():
        layer = ep_layer(key)
        if layer is not None and layer.ep_size > 1:
            parts = [torch.empty_like(t) for _ in range(layer.ep_size)]
            dist.all_gather(parts, t.contiguous(), group=layer.ep_group)
            t = torch.cat(parts, dim=0)
        out[key] = t.detach().cpu()
    return out


def gather_full(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Tensors keyed like the unwrapped model's state dict (e.g. its parameters or their gradients), in the published
    single-device layout on global rank 0 (None elsewhere): experts gathered over EP, then the pipeline stages' dicts
    merged. Collective over the whole world."""
    local = gather_experts(model.unwrap(), tensors)
    stages = model.stage_manager
    if stages is None:
        return local if dist.get_rank() == 0 else None
    if 0 not in dist.get_process_group_ranks(stages.p2p_group):
        return None  # another data-parallel replica of the same stages
    parts = [None] * stages.num_stages if dist.get_rank() == 0 else None
    dist.gather_object(local, parts, dst=0, group=stages.p2p_group)
    return {k: v for part in parts for k, v in part.items()} if parts is not None else None


def full_state_dict(model, placement: ExpertPlacement | None = None) -> dict[str, torch.Tensor] | None:
    """The single-device (published-layout) state dict of a boosted model, on global rank 0; experts and router rows
    in logical order when a placement has moved them."""
    sd = gather_full(model, model.unwrap().state_dict())
    return placement.to_logical_state_dict(sd) if sd is not None and placement is not None else sd


def export_hf(model, cfg: OpenMoeConfig, tokenizer, directory: str, placement: ExpertPlacement | None = None) -> None:
    """Write an HF-format checkpoint that `OpenMoeForCausalLM.from_pretrained` loads on one device."""
    sd = full_state_dict(model, placement)
    if sd is not None:
        write_checkpoint(directory, cfg, sd)
        tokenizer.save_pretrained(directory)
    dist.barrier()


def attach_bias_balancer(model, cfg: OpenMoeConfig, run: TrainConfig, device) -> BiasBalancer:
    """Aux-loss-free balancing: one selection bias per MoE layer, held identically on every rank."""
    layers = [m for m in model.unwrap().modules() if isinstance(m, (OpenMoeSparseMLP, ExpertParallelMoE))]
    balancer = BiasBalancer(len(layers), cfg.num_experts, run.bias_update_rate)
    balancer.attach(layers, device)
    return balancer


def logical_bias_state(balancer: BiasBalancer, placement: ExpertPlacement | None) -> dict:
    """The balancer's state with its per-expert biases in logical order (they follow the router rows when experts
    move; load_resumable moves them back with the rows)."""
    state = balancer.state_dict()
    if placement is not None:
        state["bias"] = torch.stack([placement.to_logical(b, layer) for layer, b in enumerate(state["bias"])])
    return state


def moe_layers(model) -> list[ExpertParallelMoE]:
    """The boosted model's expert-parallel MoE layers, in forward order (the order of every [layers, E] count)."""
    return [m for m in model.unwrap().modules() if isinstance(m, ExpertParallelMoE)]


def build_placement(model, cfg: OpenMoeConfig, ep_size: int) -> ExpertPlacement:
    """--load_balance: the identity placement over this model's expert-parallel MoE layers."""
    names = [name for name, m in model.unwrap().named_modules() if isinstance(m, ExpertParallelMoE)]
    if len(names) != cfg.num_moe_layers:
        raise ValueError(f"--load_balance needs every MoE layer expert-parallel; {len(names)} of "
                         f"{cfg.num_moe_layers} are")
    return ExpertPlacement(names, cfg.num_experts, ep_size)


def rebalance_experts(model, optimizer, placement: ExpertPlacement) -> list[LayerRebalance]:
    """--load_balance, every --load_balance_interval steps (after the optimizer step): move experts between EP ranks
    by the load counted since the last rebalance. Collective over the world."""
    return rebalance(moe_layers(model), placement, optimizer)


def count_expert_load(outs, device, balancer: BiasBalancer | None, placement: ExpertPlacement | None) -> None:
    """One all-reduce of this step's router choices, when --balance_mode bias or --load_balance needs them."""
    if balancer is None and placement is None:
        return
    counts = step_expert_counts(outs, device)
    if balancer is not None:
        balancer.update(counts)
    if placement is not None:
        placement.record(counts)


def step_expert_counts(outs, device) -> torch.Tensor:
    """[moe layers, E] router choices of this step summed over micro-steps and all ranks (one all-reduce)."""
    counts = sum(torch.stack([m.tokens_per_expert.float() for m in o.moe]) for o in outs).to(device)
    dist.all_reduce(counts)
    return counts


class Throughput:
    def __init__(self):
        self.t0, self.tokens = time.perf_counter(), 0

    def update(self, tokens: int) -> float:
        t = time.perf_counter()
        rate = tokens / max(t - self.t0, 1e-9)
        self.t0 = t
        return rate
