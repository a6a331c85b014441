"""The trainer's run configuration: everything that is not the architecture, in typed sections (model, parallel,
kernels, balance, data, optim, checkpoint, logging). Every field documents its meaning and its "off" value.

The command line uses flat names (`--zero_stage 2`, grouped by section in `--help`); a `--config` file (JSON or YAML)
takes the same flat keys or the sections as nested mappings; the command line wins. `RunConfig.validate()` is the one
place where values and value combinations that need no world size are checked (the parallel layout is checked by
`openmoe.parallel.sizes.resolve_sizes`, which needs it). Options whose default is "auto" (None: --lean_zero,
--adamw_kernel) are decided for the layout by `openmoe.parallel.sizes.zero_step_options` when the run is built
(openmoe.train.builder.build), which records the True/False it chose in the run it returns.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field

PLUGINS = ("ep", "ep_zero", "hybrid")
PRECISIONS = ("bf16", "fp16", "fp32")
SCHEDULES = ("cosine", "linear", "constant")
FORMATS = ("auto", "chat", "sharegpt", "alpaca", "prompt_completion", "text")  # openmoe.data_formats.FORMATS
# HF Trainer's names for our options: an unknown --learning_rate suggests --lr (spelling alone would not find it)
HF_TRAINER_NAMES = {"--learning_rate": "--lr", "--output_dir": "--output_path", "--model_name_or_path": "--pretrained",
                    "--per_device_train_batch_size": "--batch_size", "--gradient_accumulation_steps": "--grad_accum",
                    "--num_train_epochs": "--num_epochs", "--max_seq_length": "--max_length",
                    "--dataset_name": "--dataset", "--max_grad_norm": "--grad_clip",
                    "--lr_scheduler_type": "--lr_schedule", "--save_steps": "--save_interval",
                    "--logging_steps": "--log_interval", "--eval_steps": "--eval_interval",
                    "--save_total_limit": "--keep_last", "--resume_from_checkpoint": "--resume",
                    "--gradient_checkpointing": "--activation_checkpointing"}
COMM_OVERLAP_CHUNKS = 4  # --comm_overlap given without a value, as upstream's switch


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelSection:
    model_name: str = _f("tiny", "architecture: a preset (tiny, base, 8b, 34b), an HF-format checkpoint directory or "
                                 "a hub id (its config.json; weights random unless --pretrained)")
    pretrained: str | None = _f(None, "weights (and config) to start from: an HF-format directory (ours or the "
                                      "published layout) or a hub id such as OrionZheng/openmoe-8b; off: None "
                                      "(random init of every parameter)")
    tokenizer: str | None = _f(None, "tokenizer: a sentencepiece .model file, a tokenizer directory or a hub id; "
                                     "default: the model's own (--pretrained / --model_name directory); the "
                                     "shipped 768-piece test tokenizer only for the tiny preset")
    trainable: str = _f("all", "which parameters train: all, router, experts (experts + routers), non_expert "
                               "(everything but experts); the rest is frozen and gets no optimizer state",
                        choices=("all", "router", "experts", "non_expert"))
    freeze_router: bool = _f(False, "freeze the routers (with any --trainable)")
    router_aux_loss_type: str | None = _f(None, "switch (per batch) or seq (per sequence, DeepSeek); default: the "
                                                "checkpoint's")
    num_shared_experts: int | None = _f(None, "always-on shared experts (architecture: must match --pretrained)")
    router_aux_loss_factor: float | None = _f(None, "router load-balancing loss weight; default: the checkpoint's")
    router_z_loss_factor: float | None = _f(None, "router z-loss weight; default: the checkpoint's")
    label_smoothing: float | None = _f(None, "label smoothing of the LM cross-entropy; default: the checkpoint's")
    z_loss_factor: float | None = _f(None, "output z-loss weight; default: the checkpoint's")


@dataclass
class ParallelSection:
    plugin: str = _f("ep", "ep: experts over all ranks; ep_zero: ep over world/extra_dp_size ranks, each expert "
                           "replicated extra_dp_size times and ZeRO-sharded; hybrid: pipeline x expert x data",
                     choices=PLUGINS)
    ep_size: int | None = _f(None, "expert-parallel size (ep: world size; ep_zero: world/extra_dp_size; "
                                   "hybrid: required)")
    extra_dp_size: int = _f(1, "ep_zero only: MoE data-parallel replicas of each expert")
    dp_size: int | None = _f(None, "upstream's hybrid option: MoE data-parallel replicas of each expert (world / "
                                   "(pp_size * ep_size)); only checked against the layout the other sizes imply; "
                                   "off: None")
    pp_size: int = _f(1, "hybrid only: pipeline stages")
    tp_size: int = _f(1, "tensor parallel: not supported for OpenMoE, must be 1")
    sp_size: int = _f(1, "sequence parallel: not supported for OpenMoE, must be 1")
    microbatch_size: int = _f(1, "hybrid only: pipeline micro-batch size")
    precision: str = _f("bf16", "parameter/compute precision (EP requires bf16 or fp16: ColossalAI's ZeRO rejects "
                                "fp32)", choices=PRECISIONS)
    zero_stage: int = _f(1, "ZeRO stage for the optimizer (EP needs >= 1; hybrid with pp > 1 needs <= 1)")
    overlap_communication: bool = _f(False, "ZeRO: reduce gradients during backward from per-parameter hooks, on a "
                                            "side stream (ColossalAI's overlap_communication); needs zero_stage >= 1 "
                                            "and no pipeline; off: reduced after backward. Not the expert "
                                            "all-to-all: see --comm_overlap")
    lean_zero: bool | None = _f(None, "ZeRO: reduce-scatter the gradients after the step's last backward and run the "
                                      "optimizer step on flat buffers with foreach casts, skipping the copies and "
                                      "collectives colossalai spends on one-rank groups (openmoe/backend/colossal.py "
                                      "lean_zero1); same arithmetic. Default (auto): on where supported: zero_stage 1, "
                                      "no --overlap_communication, no pipeline (pp_size 1); off: --no-lean_zero "
                                      "(colossalai's all-reduce and per-parameter step)")
    offload_optimizer: bool = _f(False, "ZeRO-Offload: keep the fp32 master weights and Adam moments in host memory "
                                        "and run the optimizer step on the CPU (ColossalAI's ZeRO cpu_offload): the "
                                        "GPUs hold only the bf16 weights, gradients and activations, at the cost of "
                                        "a slower step (gradient and weight copies over PCIe, AdamW on the host). "
                                        "The host runs torch's fused AdamW on as many threads as it has cores per "
                                        "local rank. Needs zero_stage >= 1 and no pipeline; not with "
                                        "--adamw_kernel or --load_balance; off: optimizer state on the GPU")
    comm_overlap: int = _f(0, "expert all-to-all: overlap it with expert compute in N chunks, forward and backward "
                              f"(capacity routing); given alone (upstream's switch): {COMM_OVERLAP_CHUNKS} chunks; "
                              "off: 0. Not ZeRO's reduction: see --overlap_communication", const=COMM_OVERLAP_CHUNKS)
    hierarchical_alltoall: bool = _f(False, "two-level all-to-all: intra-node gather, inter-node exchange among node "
                                            "leaders, intra-node scatter (node size from LOCAL_WORLD_SIZE)")
    dist_timeout: float | None = _f(None, "seconds a collective waits for the other ranks before the run fails "
                                          "(bounds a rank that hangs alive or a peer that died); off: None (torch's "
                                          "default: 30 min on gloo, 10 min on NCCL)")


@dataclass
class KernelSection:
    use_kernel: bool = _f(False, "grouped-GEMM experts (torch._grouped_mm, no capacity padding) in MoE layers that "
                                 "are not expert-parallel (ep_size 1); off: batched matmuls over capacity buffers. "
                                 "Attention always uses PyTorch SDPA (flash kernels on GPU)")
    use_layernorm_kernel: bool = _f(False, "apex fused RMSNorm (error if apex is absent); off: PyTorch RMSNorm. Not "
                                           "the experts: see --use_kernel")
    activation_checkpointing: bool = _f(False, "recompute each decoder layer in backward")
    ac_policy: str = _f("full", "with --activation_checkpointing: full keeps only each layer's input; selective also "
                                "keeps matmul and attention outputs and recomputes only elementwise ops (more memory, "
                                "no matmul recompute)", choices=("full", "selective"))
    lm_loss_impl: str = _f("fused", "LM head + loss: fused computes the gradient chunk by chunk in the forward pass "
                                    "(no logits kept, no head recompute); fused_compiled also runs the per-chunk "
                                    "softmax math through torch.compile; chunked is the checkpointed autograd "
                                    "reference",
                           choices=("fused", "fused_compiled", "chunked"))
    dropless: bool = _f(False, "route every token (no capacity, uneven all-to-all); off: capacity factor drops")
    compile_blocks: bool = _f(False, "torch.compile each dense decoder layer, and the attention, norms and dense MLPs "
                                     "of each MoE layer, in place after the expert-parallel swap (regional compile: "
                                     "fused RMSNorm, RoPE, SwiGLU and residual adds; the MoE routing and all-to-all "
                                     "stay eager); compiles in the first step; off: eager modules")
    adamw_kernel: bool | None = _f(None, "part of --lean_zero's step: one pass per parameter updates the fp32 master "
                                         "from its bf16 gradient shard (AdamW; Triton on CUDA, torch ops on the CPU) "
                                         "and writes the experts' bf16 weights in the same pass under ep. Default "
                                         "(auto): on wherever --lean_zero is, except on CUDA without triton; off: "
                                         "--no-adamw_kernel (fp32 gradient copies and torch's fused AdamW)")

@dataclass
class BalanceSection:
    load_balance: bool = _f(False, "expert placement rebalancing: every load_balance_interval steps, experts trade "
                                   "EP ranks (weights, fp32 masters, Adam moments and router rows move together) so "
                                   "the busiest rank gets fewer tokens; checkpoints and exports keep the logical "
                                   "expert order. Needs ep_size >= 2 and pp_size 1; off: no moves. Not the router "
                                   "bias: see --balance_mode")
    load_balance_interval: int = _f(1000, "with --load_balance: steps between rebalances (>= 1), each planned on the "
                                          "tokens routed since the previous one")
    balance_mode: str = _f("none", "bias: auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias on the "
                                   "routing scores for expert selection only, nudged every step toward uniform load "
                                   "and saved in checkpoints; off: none. Not expert moves: see --load_balance",
                           choices=("none", "bias"))
    bias_update_rate: float = _f(1e-3, "step of the bias balancing update")


@dataclass
class DataSection:
    dataset: str = _f("data/sample/train.jsonl", "local .json/.jsonl/.parquet/.csv/.txt file or directory "
                                                 "(split-aware), a datasets.save_to_disk directory, or a hub id "
                                                 "(e.g. yizhongw/self_instruct)", aliases=("-d",))
    task_name: str | None = _f(None, "dataset config name for hub datasets (e.g. super_natural_instructions)")
    split: str = _f("train", "dataset split (a slice like train[:1000] works)")
    data_format: str = _f("auto", "how records become text and loss masks: prompt_completion, alpaca (instruction/"
                                  "input/output), chat (messages), sharegpt (conversations), text (raw, packed); "
                                  "auto: detected from the fields", choices=FORMATS)
    prompt_field: str = _f("prompt", "prompt_completion: field holding the prompt")
    completion_field: str = _f("completion", "prompt_completion: field holding the completion")
    text_field: str = _f("text", "text: field holding the raw text (continued pre-training)")
    system_prompt: str | None = _f(None, "chat formats: system prompt for records without one; default: "
                                         "OpenMoE-8B-Chat's, or the tokenizer chat_template's own")
    mask_prompt: bool | None = _f(None, "no loss on prompt/user/system tokens; default: the format's (on for chat, "
                                        "sharegpt and alpaca, off for prompt_completion)")
    pack: bool | None = _f(None, "pack examples into max_length blocks; default: raw text only")
    max_length: int = _f(64, "tokens per example (truncate); at most the model's max_position_embeddings")
    streaming: bool = _f(False, "read the corpus as it is consumed (larger than RAM or disk); needs --max_steps")
    shuffle_buffer: int = _f(10000, "with --streaming: examples shuffled through a seeded buffer of this size; "
                                    "off: 0 (stream order)")
    num_proc: int | None = _f(None, "processes tokenizing with datasets.map (tokenized once, cached); off: None "
                                    "(this process)")
    cache_dir: str | None = _f(None, "datasets' cache for the tokenized data; default: ~/.cache/huggingface/datasets")
    eval_dataset: str | None = _f(None, "evaluation data (same kinds as --dataset); default: --dataset when "
                                        "--eval_split is given; off: no evaluation")
    eval_split: str | None = _f(None, "split of the evaluation data; off: None (no evaluation unless --eval_dataset)")
    eval_samples: int | None = _f(None, "evaluate on the first N records; off: None (all)")
    eval_interval: int = _f(0, "evaluate every N steps (and after the last); off: 0 (only after the last)")
    eval_only: bool = _f(False, "evaluate the model (--pretrained or the newest checkpoint with --resume) and exit")


@dataclass
class LoraSection:
    lora_rank: int = _f(0, "LoRA: rank of the adapters on the attention and dense MLP projections (PEFT); every other "
                           "weight is frozen (no optimizer state); off: 0 (full fine-tuning)")
    lora_alpha: float | None = _f(None, "LoRA scaling numerator (the update is alpha / rank * B A); default: 2 * rank")
    lora_dropout: float = _f(0.0, "LoRA dropout on the adapter input; off: 0")
    lora_targets: str | None = _f(None, "comma-separated linear layer names to adapt; default: q_proj,k_proj,v_proj,"
                                        "o_proj,gate_proj,up_proj,down_proj")
    merge_lora: bool = _f(False, "also export the merged model (W + alpha / rank * B A) in HF format under hf/; off: "
                                 "only the PEFT adapter under adapter/")


@dataclass
class OptimSection:
    batch_size: int = _f(4, "examples per GPU (per data-parallel rank) per micro-step")
    grad_accum: int = _f(1, "micro-steps per optimizer step")
    num_epochs: int = _f(3, "passes over the data", aliases=("--num_epoch",))
    max_steps: int | None = _f(None, "stop after this many optimizer steps; off: None (num_epochs decides)")
    lr: float = _f(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(10, "linear warmup steps")
    lr_schedule: str = _f("cosine", "decay after warmup", choices=SCHEDULES)
    min_lr_ratio: float = _f(0.1, "final lr as a fraction of lr (cosine/linear)")
    grad_clip: float = _f(1.0, "max global grad norm; off: 0")
    max_bad_steps: int = _f(3, "stop after this many consecutive steps with a non-finite loss (each is skipped: "
                               "no update); the last good checkpoint is left untouched. fp16 overflow steps are "
                               "skipped too and count once the loss scale is at its minimum")
    seed: int = _f(42, "seed for init, data order and dropout-free sampling")


@dataclass
class CheckpointSection:
    output_path: str = _f("outputs/tiny-ep", "run directory: checkpoints, metrics, final HF-format model")
    save_interval: int = _f(0, "save a resumable checkpoint every N steps; off: 0 (only at the end)",
                            aliases=("-i",))
    keep_last: int = _f(2, "resumable checkpoints kept (older ones are deleted)")
    resume: bool = _f(False, "continue from the newest complete checkpoint in output_path")
    overwrite: bool = _f(False, "start a new run in an output_path that holds an earlier run's checkpoints, deleting "
                                "them (its checkpoints, hf export, metrics); off: such a directory is refused")
    preempt_grace_s: float = _f(120.0, "on SIGTERM/SIGINT every rank finishes its current step, saves a checkpoint "
                                       "and exits (code 143/130); if that takes longer than this many seconds the "
                                       "rank exits without saving. Signal the launcher (train.sh / python -m "
                                       "openmoe.launch): a torchrun that is signalled itself kills its ranks 30 s "
                                       "later")


@dataclass
class LoggingSection:
    log_interval: int = _f(1, "steps between metric records")
    tensorboard: bool = _f(True, "also write TensorBoard events")
    wandb: str | None = _f(None, "also log to Weights & Biases under this project (WANDB_MODE=offline works without "
                                 "network); off: None")


SECTIONS = {"model": ModelSection, "parallel": ParallelSection, "kernels": KernelSection,
            "balance": BalanceSection, "data": DataSection, "lora": LoraSection, "optim": OptimSection,
            "checkpoint": CheckpointSection, "logging": LoggingSection}
SECTION_OF = {f.name: name for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}  # flat key -> section
_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    kernels: KernelSection = field(default_factory=KernelSection)
    balance: BalanceSection = field(default_factory=BalanceSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    @classmethod
    def from_flat(cls, **values) -> RunConfig:
        """Build from flat keys (`plugin="ep", lr=1e-3`), validated."""
        unknown = sorted(set(values) - set(SECTION_OF))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; accepted: {sorted(SECTION_OF)}")
        parts = {name: {} for name in SECTIONS}
        for key, value in values.items():
            parts[SECTION_OF[key]][key] = value
        run = cls(**{name: SECTIONS[name](**kw) for name, kw in parts.items()})
        run.validate()
        return run

    def replace(self, **values) -> RunConfig:
        """A copy with some flat keys changed, validated."""
        return RunConfig.from_flat(**{**self.to_flat(), **values})

    def to_flat(self) -> dict:
        return {k: v for section in self.to_dict().values() for k, v in section.items()}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Types, choices and ranges of single values; one line naming the option, the value and what is accepted."""
        for name in SECTIONS:
            section = getattr(self, name)
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                setattr(section, f.name, _checked(f, value))
        positive = {"batch_size": self.optim.batch_size, "grad_accum": self.optim.grad_accum,
                    "log_interval": self.logging.log_interval, "keep_last": self.checkpoint.keep_last,
                    "max_bad_steps": self.optim.max_bad_steps}
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"--{key} ({value}) must be >= 1")
        self._validate_data_and_lora()
        if self.data.streaming and self.optim.max_steps is None:
            raise ValueError("--streaming reads a corpus of unknown length: give --max_steps")
        if self.optim.max_steps is not None and self.optim.max_steps < 1:
            raise ValueError(f"--max_steps ({self.optim.max_steps}) must be >= 1 (or unset: --num_epochs decides)")
        if self.checkpoint.overwrite and self.checkpoint.resume:
            raise ValueError("--overwrite deletes the checkpoints that --resume would continue; accepted: one of them")
        if self.kernels.compile_blocks and self.kernels.use_layernorm_kernel:
            raise ValueError("--compile_blocks fuses the RMSNorms itself and does not trace apex's kernel "
                             "(--use_layernorm_kernel); accepted: one of them")
        if self.kernels.compile_blocks and self.parallel.pp_size > 1:
            raise ValueError(f"--compile_blocks is not supported with a pipeline (--pp_size {self.parallel.pp_size}) "
                             "yet: it has not been tested under the 1F1B schedule; accepted: --pp_size 1")
        if self.parallel.dist_timeout is not None and self.parallel.dist_timeout <= 0:
            raise ValueError(f"--dist_timeout ({self.parallel.dist_timeout}) must be > 0 seconds (or unset)")
        if self.checkpoint.preempt_grace_s <= 0:
            raise ValueError(f"--preempt_grace_s ({self.checkpoint.preempt_grace_s}) must be > 0")
        for key, value in {"save_interval": self.checkpoint.save_interval, "warmup_steps": self.optim.warmup_steps,
                           "eval_interval": self.data.eval_interval}.items():
            if value < 0:
                raise ValueError(f"--{key} ({value}) must be >= 0 (0 is off)")


    def _validate_data_and_lora(self) -> None:
        if self.data.eval_only and self.data.eval_dataset is None and self.data.eval_split is None:
            raise ValueError("--eval_only needs an eval set: --eval_dataset FILE or --eval_split SPLIT")
        if self.lora.lora_rank < 0:
            raise ValueError(f"--lora_rank ({self.lora.lora_rank}) must be >= 1, or 0 for full fine-tuning")
        if self.lora.lora_rank and self.model.trainable != "all":
            raise ValueError(f"--lora_rank trains only the adapters; --trainable {self.model.trainable} does not apply "
                             "(accepted with LoRA: all)")
        if (self.lora.merge_lora or self.lora.lora_targets) and not self.lora.lora_rank:
            raise ValueError("--merge_lora / --lora_targets need --lora_rank >= 1")
        if not 0 <= self.lora.lora_dropout < 1:
            raise ValueError(f"--lora_dropout ({self.lora.lora_dropout}) must be in [0, 1)")

def _checked(f: dataclasses.Field, value):
    """value converted to the field's type (YAML may give `1e-4` as a string, JSON an int for a float)."""
    kinds = [t.strip() for t in str(f.type).split("|")]
    if value is None:
        if "None" in kinds:
            return None
        raise ValueError(f"--{f.name} needs a value")
    kind = _TYPES[next(k for k in kinds if k != "None")]
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"--{f.name} '{value}' is not a boolean; accepted: true, false")
    elif kind in (int, float):
        try:
            converted = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"--{f.name} '{value}' is not a{'n integer' if kind is int else ' number'}") from None
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and value != converted):
            raise ValueError(f"--{f.name} '{value}' is not a{'n integer' if kind is int else ' number'}")
        value = converted
    else:
        value = str(value)
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"--{f.name} '{value}' is not supported; accepted: {list(choices)}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from openmoe.launch import OneLineErrorParser

    # prog: under torchrun sys.argv[0] may be any path to train.py; errors say how to get the help
    parser = OneLineErrorParser(prog="train.py", synonyms=HF_TRAINER_NAMES,
                                description="Train OpenMoE with expert parallelism on ColossalAI. Launch: "
                                            "colossalai run --nproc_per_node N train.py [options]")
    parser.add_argument("--config", default=None, help="JSON or YAML file with any of these keys, flat or under "
                                                       "their section names (command line wins)")
    for name, cls in SECTIONS.items():
        group = parser.add_argument_group(name)
        for f in dataclasses.fields(cls):
            flags, meta = (f"--{f.name}", *f.metadata.get("aliases", ())), f.metadata
            if str(f.type).split("|")[0].strip() == "bool":
                group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None, help=meta["help"])
                continue
            kind = _TYPES.get(str(f.type).split("|")[0].strip(), str)
            optional_value = dict(nargs="?", const=meta["const"]) if "const" in meta else {}
            group.add_argument(*flags, dest=f.name, type=kind, default=None, choices=meta.get("choices"),
                               help=meta["help"], **optional_value)
    return parser


def load_config_file(path: str) -> dict:
    """Flat keys from a JSON/YAML file whose keys are flat or nested under section names."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config file {path} does not exist")
    try:
        with open(path) as f:
            if path.endswith((".yaml", ".yml")):
                import yaml

                data = yaml.safe_load(f) or {}
            else:
                data = json.load(f)
    except (ValueError, ImportError) as e:  # yaml.YAMLError and json.JSONDecodeError are ValueErrors / YAMLErrors
        raise ValueError(f"--config {path} cannot be parsed: {e}") from None
    except Exception as e:  # yaml's own errors do not derive from ValueError
        raise ValueError(f"--config {path} cannot be parsed: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a mapping of option names to values")
    flat = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    unknown = sorted(set(flat) - set(SECTION_OF))
    if unknown:
        raise ValueError(f"--config {path} has unknown key(s) {unknown}; accepted: {sorted(SECTION_OF)}")
    return flat


def parse_args(argv=None) -> RunConfig:
    args = vars(build_parser().parse_args(argv))
    path = args.pop("config")
    values = load_config_file(path) if path else {}
    values.update({k: v for k, v in args.items() if v is not None})
    return RunConfig.from_flat(**values)
