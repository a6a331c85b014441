"""The one setup sequence: distributed init -> model config -> parallel layout (and the automatic options it
decides) -> plugin -> data -> model -> optimizer -> boost (with the clipping fix; lean ZeRO-1 where the run uses it)
-> regional compile (--compile_blocks) -> balancing state -> resume.
Used by train.py, the tests and the benchmarks (`build(run)`), so no caller can forget a step.
"""

from __future__ import annotations

import math
import os
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from openmoe.backend.colossal import Boosted, boost, build_plugin, dp_rank, init_distributed
from openmoe.config import ModelOptions, OpenMoeConfig, preset
from openmoe.finetune import trainable_parameters
from openmoe.model import OpenMoeForCausalLM
from openmoe.moe import OpenMoeSparseMLP
from openmoe.parallel.expert_parallel import ExpertParallelMoE
from openmoe.parallel.load_balance import BiasBalancer, ExpertPlacement
from openmoe.parallel.sizes import ParallelSizes, resolve_sizes, zero_step_options
from openmoe.train.config import RunConfig


@dataclass
class TrainState:
    """Everything a run holds after setup. `boosted.model` is the wrapped model (`.unwrap()` gives ours)."""

    run: RunConfig
    cfg: OpenMoeConfig
    sizes: ParallelSizes
    rank: int
    world: int
    device: torch.device
    boosted: Boosted
    tokenizer: object | None = None
    batches: object | None = None  # data.ShardedBatches: iterable, with state_dict/load_state_dict
    total_steps: int = 0
    balancer: BiasBalancer | None = None  # --balance_mode bias
    placement: ExpertPlacement | None = None  # --load_balance
    eval_examples: object | None = None  # the eval set (input_ids/labels rows), or None without evaluation
    start_step: int = 0  # > 0 after a resume
    data_state: dict | None = None  # the resumed data position (already applied to batches)

    @property
    def model(self):
        return self.boosted.model

    @property
    def optimizer(self):
        return self.boosted.optimizer

    @property
    def scheduler(self):
        return self.boosted.scheduler

    @property
    def booster(self):
        return self.boosted.booster


def build(run: RunConfig, *, training: bool = True, customize_model: Callable[[OpenMoeForCausalLM], None] | None = None,
          make_optimizer: Callable[[OpenMoeForCausalLM], torch.optim.Optimizer] | None = None,
          init_context: Callable[[], AbstractContextManager] = nullcontext,
          config: OpenMoeConfig | None = None) -> TrainState:
    """Set up a run on this rank. training=False skips the data, the output directory and resume (tests and
    benchmarks that feed their own batches); customize_model runs on the single-device model before boosting;
    make_optimizer replaces AdamW + the LR schedule (then there is no scheduler, and --adamw_kernel is on only when
    the run asks for it); the model is created inside init_context() (e.g. directly on the GPU in bf16: an 8B model
    initialises in seconds there, minutes on the CPU); config replaces the architecture the run names (benchmarks
    truncate a preset's depth). The returned state's run has --lean_zero / --adamw_kernel decided (True/False)."""
    rank, world, device = init_distributed(run.optim.seed)
    cfg = config if config is not None else model_config(run)
    sizes = resolve_sizes(run, cfg, world)
    # --lean_zero / --adamw_kernel unset (auto) become True/False here, so that the logs, the checkpoints' run record
    # and the --resume report show what ran
    run = run.replace(**zero_step_options(run, sizes.pp, own_optimizer=make_optimizer is None))
    plugin = build_plugin(run, sizes)
    if run.parallel.offload_optimizer:
        host_step_threads()
    tokenizer = batches = eval_examples = None
    total_steps = run.optim.max_steps or 0
    if training:
        check_output_path(run.checkpoint.output_path)
        tokenizer, batches, eval_examples = build_data(run, cfg, dp_rank(plugin), sizes.dp)
        total_steps = run.optim.max_steps or run.optim.num_epochs * (len(batches) // run.optim.grad_accum)
    with init_context():
        model = build_model(run, cfg)
    if customize_model is not None:
        customize_model(model)
    if run.parallel.offload_optimizer:
        check_host_memory(model, sizes)
    if make_optimizer is not None:
        optimizer, scheduler = make_optimizer(model), None
    else:
        optimizer, scheduler = build_optimizer(run, model, total_steps)
    boosted = boost(plugin, model, optimizer, scheduler, lean_zero=run.parallel.lean_zero,
                    adamw_kernel=run.kernels.adamw_kernel)
    if run.kernels.compile_blocks:  # after the EP swap, so that no compiled region holds an all-to-all
        from openmoe.kernels import compile_blocks

        compile_blocks(boosted.model.unwrap())
    balancer = attach_bias_balancer(boosted.model, cfg, run, device) if run.balance.balance_mode == "bias" else None
    placement = build_placement(boosted.model, cfg, sizes.ep) if run.balance.load_balance else None
    state = TrainState(run, cfg, sizes, rank, world, device, boosted, tokenizer, batches, total_steps, balancer,
                       placement, eval_examples)
    if training and run.checkpoint.resume:
        from openmoe.train.checkpointing import resume

        resume(state)
    return state


def model_source(run: RunConfig) -> tuple[str | None, str]:
    """(local checkpoint directory or None for a preset, the name given): --pretrained, else --model_name, each a
    directory, a hub id (downloaded into / read from the HF cache; HF_HUB_OFFLINE=1 reads only the cache) or a
    preset name."""
    from openmoe.hub import resolve_model

    name = run.model.pretrained or run.model.model_name
    return resolve_model(name), name


def model_config(run: RunConfig) -> OpenMoeConfig:
    model_dir, name = model_source(run)
    cfg = OpenMoeConfig.load(model_dir) if model_dir is not None else preset(name)
    overrides = {k: getattr(run.model, k) for k in ("router_aux_loss_factor", "router_z_loss_factor", "label_smoothing",
                                              "z_loss_factor", "router_aux_loss_type", "num_shared_experts")
                 if getattr(run.model, k) is not None}
    cfg = cfg.replace(**overrides) if overrides else cfg
    if run.data.max_length > cfg.max_position_embeddings:
        raise ValueError(f"--max_length ({run.data.max_length}) exceeds the model's max_position_embeddings "
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


def model_options(run: RunConfig) -> ModelOptions:
    """The run's kernel and memory switches as the model's options (the one place they are set on the model)."""
    k = run.kernels
    return ModelOptions(expert_impl="grouped" if k.use_kernel else "bmm", lm_loss_impl=k.lm_loss_impl,
                        activation_checkpointing=k.activation_checkpointing, ac_policy=k.ac_policy,
                        dropless=k.dropless, fused_rmsnorm=k.use_layernorm_kernel)


def build_model(run: RunConfig, cfg: OpenMoeConfig) -> OpenMoeForCausalLM:
    """Full model on every rank, same seed everywhere (dense replicas agree; the EP policy slices experts)."""
    torch.manual_seed(run.optim.seed)
    if run.model.pretrained:
        model = OpenMoeForCausalLM.from_pretrained(model_source(run)[0])
        model.config = cfg  # run overrides of the loss factors
    else:
        model = OpenMoeForCausalLM(cfg)
    model.apply_options(model_options(run))
    # frozen parameters get requires_grad False before the optimizer exists, so they never get optimizer state
    if run.lora.lora_rank:
        from openmoe.train.lora import apply_lora

        apply_lora(model, run)
    else:
        trainable_parameters(model, run.model.trainable, run.model.freeze_router)
    return model


def data_spec(run: RunConfig):
    """The run's data options as the data layer's DataSpec."""
    from openmoe.data import DataSpec

    d = run.data
    return DataSpec(source=d.dataset, task_name=d.task_name, split=d.split, data_format=d.data_format,
                    prompt_field=d.prompt_field, completion_field=d.completion_field, text_field=d.text_field,
                    system_prompt=d.system_prompt,
                    mask_prompt=d.mask_prompt, max_length=d.max_length, pack=d.pack, streaming=d.streaming,
                    num_proc=d.num_proc, cache_dir=d.cache_dir, eval_source=d.eval_dataset, eval_split=d.eval_split,
                    eval_samples=d.eval_samples)


def build_data(run: RunConfig, cfg: OpenMoeConfig, dp_rank: int, dp_size: int):
    """(tokenizer, this rank's training batches, eval examples or None). Records are tokenized once with
    datasets.map and cached: the first process of each node tokenizes, the others then read its cache."""
    from openmoe import data
    from openmoe.hub import tokenizer_path
    from openmoe.tokenizer import load_tokenizer

    model_dir, name = model_source(run)
    # --tokenizer, else the model's own; the shipped test tokenizer only for the tiny preset
    tokenizer = load_tokenizer(tokenizer_path(model_dir, name, run.model.tokenizer))
    data.check_vocab(tokenizer, cfg.vocab_size)
    spec = data_spec(run)
    with _node_leader_first():
        examples = data.build_examples(spec, tokenizer)
        eval_examples = data.build_eval_examples(spec, tokenizer)
    # Fixed [B, max_length] shapes: every EP rank then computes the same capacity, so all-to-all splits are equal.
    shared = dict(seed=run.optim.seed, pad_id=cfg.pad_token_id, max_length=run.data.max_length)
    if spec.streaming:
        batches = data.StreamingBatches(examples, run.optim.batch_size, dp_rank, dp_size,
                                        shuffle_buffer=run.data.shuffle_buffer, **shared)
    else:
        batches = data.ShardedBatches(examples, run.optim.batch_size, dp_rank, dp_size, **shared)
    return tokenizer, batches, eval_examples


@contextmanager
def _node_leader_first():
    """Run the body on each node's local rank 0 first, then on the node's other ranks (which find its caches)."""
    leader = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if not leader:
        dist.barrier()
    try:
        yield
    finally:  # on an error too: the others then meet it themselves and report the same one line
        if leader:
            dist.barrier()


def host_step_threads() -> int:
    """--offload_optimizer runs AdamW on the host, memory-bound over every master of this rank: give it this local
    rank's share of the cores. torchrun (and so `colossalai run`) starts each worker with OMP_NUM_THREADS=1, which
    left one thread for 5.9B masters per rank on the full 8B at EP 2 (~30 s a step). Returns torch's thread count."""
    share = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if share > torch.get_num_threads():
        torch.set_num_threads(share)
    return torch.get_num_threads()


OFFLOAD_BYTES_PER_PARAM = 12  # fp32 master, exp_avg, exp_avg_sq in host memory


def check_host_memory(model: torch.nn.Module, sizes: ParallelSizes, available: int | None = None) -> int:
    """--offload_optimizer, before ZeRO allocates the host state: the bytes this node's ranks need for it (12 per
    trainable parameter of each rank's ZeRO shard: dense ones over dp ranks, experts over ep x moe_dp), refused in
    one line when the node's available memory (MemAvailable, and the cgroup's limit where there is one) is smaller;
    otherwise the kernel's OOM killer would end the run at the first step without a word. Returns the bytes."""
    experts = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".experts." in n)
    dense = sum(p.numel() for p in model.parameters() if p.requires_grad) - experts
    per_rank = (dense / sizes.dp + experts / (sizes.ep * sizes.moe_dp)) * OFFLOAD_BYTES_PER_PARAM
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    need = int(per_rank * local)
    available = host_memory_available() if available is None else available
    if need > available:
        raise ValueError(f"--offload_optimizer needs about {need / 2**30:.1f} GiB of host memory on this node for the "
                         f"optimizer state ({local} ranks x {per_rank / 2**30:.1f} GiB: {OFFLOAD_BYTES_PER_PARAM} "
                         f"bytes per parameter of each rank's ZeRO shard); {available / 2**30:.1f} GiB is available: "
                         f"spread the run over more GPUs or nodes, or drop --offload_optimizer")
    return need


def host_memory_available() -> int:
    """Bytes this process's node can still allocate: /proc/meminfo's MemAvailable, capped by a cgroup v2 limit."""
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except OSError:
        pass
    return avail


def lr_lambda(run: RunConfig, total_steps: int):
    def f(step: int) -> float:
        if step < run.optim.warmup_steps:
            return (step + 1) / run.optim.warmup_steps
        if run.optim.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - run.optim.warmup_steps) / max(1, total_steps - run.optim.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if run.optim.lr_schedule == "cosine" else 1 - progress
        return run.optim.min_lr_ratio + (1 - run.optim.min_lr_ratio) * shape

    return f


def build_optimizer(run: RunConfig, model: torch.nn.Module, total_steps: int):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]  # norms
    # fused: one kernel per parameter group for the whole update (measured on an H200 at 5.5B parameters: the
    # default foreach AdamW took ~100 ms a step, more than the forward+backward matmuls of 8k tokens)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": run.optim.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=run.optim.lr, betas=(0.9, 0.95), fused=True)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(run, total_steps))


def attach_bias_balancer(model, cfg: OpenMoeConfig, run: RunConfig, device) -> BiasBalancer:
    """Aux-loss-free balancing: one selection bias per MoE layer, held identically on every rank."""
    layers = [m for m in model.unwrap().modules() if isinstance(m, (OpenMoeSparseMLP, ExpertParallelMoE))]
    balancer = BiasBalancer(len(layers), cfg.num_experts, run.balance.bias_update_rate)
    balancer.attach(layers, device)
    return balancer


def build_placement(model, cfg: OpenMoeConfig, ep_size: int) -> ExpertPlacement:
    """--load_balance: the identity placement over this model's expert-parallel MoE layers."""
    names = [name for name, m in model.unwrap().named_modules() if isinstance(m, ExpertParallelMoE)]
    if len(names) != cfg.num_moe_layers:
        raise ValueError(f"--load_balance needs every MoE layer expert-parallel; {len(names)} of "
                         f"{cfg.num_moe_layers} are")
    return ExpertPlacement(names, cfg.num_experts, ep_size)
