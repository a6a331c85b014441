"""The trainer's run configuration: everything that is not the architecture (parallel sizes, kernels, data,
optimiser, checkpointing). One dataclass; the command line and an optional --config file (JSON or YAML, same keys)
fill it, the command line winning. Every field documents its meaning and its "off" value.
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


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- model ---
    model_name: str = _f("tiny", "architecture preset (tiny, base, 8b, 34b) or an HF-format checkpoint directory")
    pretrained: str | None = _f(None, "HF-format checkpoint directory to load weights (and config) from; off: None "
                                      "(random init of every parameter)")
    tokenizer: str = _f("tests/assets/tokenizer", "sentencepiece tokenizer (directory or .model file); published "
                                                  "models use the umT5 tokenizer")
    # --- parallelism ---
    plugin: str = _f("ep", "ep: experts over all ranks; ep_zero: ep over world/extra_dp_size ranks, each expert "
                           "replicated extra_dp_size times and ZeRO-sharded; hybrid: pipeline x expert x data",
                     choices=PLUGINS)
    ep_size: int | None = _f(None, "expert-parallel size (ep: world size; ep_zero: world/extra_dp_size; "
                                   "hybrid: required)")
    extra_dp_size: int = _f(1, "ep_zero only: MoE data-parallel replicas of each expert")
    pp_size: int = _f(1, "hybrid only: pipeline stages")
    tp_size: int = _f(1, "tensor parallel: not supported for OpenMoE, must be 1")
    sp_size: int = _f(1, "sequence parallel: not supported for OpenMoE, must be 1")
    zero_stage: int = _f(1, "ZeRO stage for the optimizer (EP needs >= 1; hybrid with pp > 1 needs <= 1)")
    overlap_communication: bool = _f(False, "ZeRO gradient reduction during backward from per-parameter hooks, on a "
                                            "side stream (ColossalAI's overlap_communication); needs zero_stage >= 1 "
                                            "and no pipeline; off: reduced after backward")
    microbatch_size: int = _f(1, "hybrid only: pipeline micro-batch size")
    precision: str = _f("bf16", "parameter/compute precision (EP requires bf16 or fp16: ColossalAI's ZeRO rejects "
                                "fp32)", choices=PRECISIONS)
    # --- kernels and memory ---
    use_kernel: bool = _f(False, "grouped-GEMM experts (torch._grouped_mm, no capacity padding) in MoE layers that "
                                 "are not expert-parallel (ep_size 1); off: batched matmuls over capacity buffers. "
                                 "Attention always uses PyTorch SDPA (flash kernels on GPU)")
    use_layernorm_kernel: bool = _f(False, "apex fused RMSNorm (error if apex is absent)")
    activation_checkpointing: bool = _f(False, "recompute each decoder layer in backward")
    ac_policy: str = _f("full", "with --activation_checkpointing: full keeps only each layer's input; selective also "
                                "keeps matmul and attention outputs and recomputes only elementwise ops (more memory, "
                                "no matmul recompute)", choices=("full", "selective"))
    lm_loss_impl: str = _f("fused", "LM head + loss: fused computes the gradient chunk by chunk in the forward pass "
                                    "(no logits kept, no head recompute); fused_compiled also runs the per-chunk "
                                    "softmax math through torch.compile; chunked is the checkpointed autograd reference",
                           choices=("fused", "fused_compiled", "chunked"))
    dropless: bool = _f(False, "route every token (no capacity, uneven all-to-all); off: capacity factor drops")
    # --- MoE balancing / overlap (issue #5) ---
    load_balance: bool = _f(False, "expert placement rebalancing: every load_balance_interval steps, experts trade "
                                   "EP ranks (weights, fp32 masters, Adam moments and router rows move together) so "
                                   "the busiest rank gets fewer tokens; checkpoints and exports keep the logical "
                                   "expert order. Needs ep_size >= 2 and pp_size 1; off: no moves")
    load_balance_interval: int = _f(1000, "with --load_balance: steps between rebalances (>= 1), each planned on the "
                                          "tokens routed since the previous one")
    balance_mode: str = _f("none", "bias: auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias on the "
                                   "routing scores for expert selection only, nudged every step toward uniform load and "
                                   "saved in checkpoints; off: none", choices=("none", "bias"))
    bias_update_rate: float = _f(1e-3, "step of the bias balancing update")
    comm_overlap: int = _f(0, "overlap the expert all-to-all with expert compute in N chunks, forward and backward "
                              "(capacity routing); off: 0")
    hierarchical_alltoall: bool = _f(False, "two-level all-to-all: intra-node gather, inter-node exchange among node "
                                            "leaders, intra-node scatter (node size from LOCAL_WORLD_SIZE)")
    # --- dense-to-MoE fine-tuning ---
    trainable: str = _f("all", "which parameters train: all, router, experts (experts + routers), non_expert "
                               "(everything but experts); the rest is frozen and gets no optimizer state",
                        choices=("all", "router", "experts", "non_expert"))
    freeze_router: bool = _f(False, "freeze the routers (with any --trainable)")
    router_aux_loss_type: str | None = _f(None, "switch (per batch) or seq (per sequence, DeepSeek); default: the "
                                                "checkpoint's")
    num_shared_experts: int | None = _f(None, "always-on shared experts (architecture: must match --pretrained)")
    # --- loss factors (default: the checkpoint's config) ---
    router_aux_loss_factor: float | None = _f(None, "router load-balancing loss weight")
    router_z_loss_factor: float | None = _f(None, "router z-loss weight")
    label_smoothing: float | None = _f(None, "label smoothing of the LM cross-entropy")
    z_loss_factor: float | None = _f(None, "output z-loss weight")
    # --- data ---
    dataset: str = _f("data/sample/train.jsonl", "local .json/.jsonl/.parquet file or directory, or a hub id "
                                                 "(e.g. yizhongw/self_instruct)")
    task_name: str | None = _f(None, "dataset config name for hub datasets (e.g. super_natural_instructions)")
    split: str = _f("train", "dataset split")
    prompt_field: str = _f("prompt", "field holding the prompt")
    completion_field: str = _f("completion", "field holding the completion")
    mask_prompt: bool = _f(False, "no loss on prompt tokens")
    pack: bool = _f(False, "pack examples into max_length blocks")
    max_length: int = _f(64, "tokens per example (truncate); at most the model's max_position_embeddings")
    # --- optimisation ---
    batch_size: int = _f(4, "examples per GPU (per data-parallel rank) per micro-step")
    grad_accum: int = _f(1, "micro-steps per optimizer step")
    num_epochs: int = _f(3, "passes over the data")
    max_steps: int | None = _f(None, "stop after this many optimizer steps; off: None (num_epochs decides)")
    lr: float = _f(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(10, "linear warmup steps")
    lr_schedule: str = _f("cosine", "decay after warmup", choices=SCHEDULES)
    min_lr_ratio: float = _f(0.1, "final lr as a fraction of lr (cosine/linear)")
    grad_clip: float = _f(1.0, "max global grad norm; off: 0")
    max_bad_steps: int = _f(3, "stop after this many consecutive steps with a non-finite loss (each is skipped: "
                               "no update); the last good checkpoint is left untouched")
    seed: int = _f(42, "seed for init, data order and dropout-free sampling")
    # --- output, checkpoints, logging ---
    output_path: str = _f("outputs/tiny-ep", "run directory: checkpoints, metrics, final HF-format model")
    save_interval: int = _f(0, "save a resumable checkpoint every N steps; off: 0 (only at the end)")
    keep_last: int = _f(2, "resumable checkpoints kept (older ones are deleted)")
    resume: bool = _f(False, "continue from the newest complete checkpoint in output_path")
    log_interval: int = _f(1, "steps between metric records")
    tensorboard: bool = _f(True, "also write TensorBoard events")
    config: str | None = _f(None, "JSON or YAML file with any of these keys (command line wins)")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"--{f.name} '{getattr(self, f.name)}' is not supported; accepted: {list(choices)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train OpenMoE with expert parallelism on ColossalAI. Launch: "
                                     "colossalai run --nproc_per_node N train.py [options]")
    for f in dataclasses.fields(TrainConfig):
        name, meta = f"--{f.name}", f.metadata
        if f.type in ("bool", bool):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=meta["help"])
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0].replace("|", "").strip(), str)
            parser.add_argument(name, type=kind, default=None, choices=meta.get("choices"), help=meta["help"])
    return parser


def _load_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config file {path} does not exist")
    with open(path) as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(f) or {}
        else:
            data = json.load(f)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"--config {path} has unknown key(s) {unknown}; accepted: {sorted(names)}")
    return data


def parse_args(argv=None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    values = _load_file(args["config"]) if args.get("config") else {}
    values.update({k: v for k, v in args.items() if v is not None})
    return TrainConfig(**values)
