"""Training throughput, model FLOP/s, MFU, peak memory and all-to-all share of ONE configuration.

    torchrun --standalone --nproc_per_node 2 benchmark/train_bench.py --kind ours --model 8b --layers 4 \
        --moe_layer_interval 1 --plugin ep --batch_size 4 --seq 2048 --name 8b-ep --out outputs/bench
    # normally launched by benchmark/run_train_bench.py, which runs every configuration and prints the table

Kinds (all three train the same synthetic batches: random token ids in [2, vocab) after a <pad> BOS, seq tokens per
row, attention mask all ones, labels = inputs; routing is real, i.e. the router runs on the actual hidden states with
capacity drops where configured, never forced to balance; weights are randomly initialised):
  ours     OpenMoeForCausalLM through the trainer's own pieces (openmoe.train.builder build_model /
           build_optimizer, openmoe.train.step train_step, openmoe.parallel.sizes resolve_sizes,
           openmoe.backend.colossal build_plugin / boost): ColossalAI
           MoeHybridParallelPlugin with our policy, ZeRO-1, bf16, AdamW, grad clip 1.0. One step = train_step
           (forward, backward, finiteness check, optimizer step); no metric logging.
  mixtral  baseline (a): transformers 4.51 MixtralForCausalLM (SDPA attention) boosted by MoeHybridParallelPlugin with
           ColossalAI's built-in Mixtral policy (no custom_policy), ep_size = world, ZeRO-1, bf16, AdamW, max_norm 1.0,
           configured to the OpenMoE shape (see mixtral_config for what differs).
  naive    baseline (b): our model with every MoE layer replaced by benchmark/naive_moe.py (dense [T, E, C] dispatch
           and combine einsums, a Python loop over per-expert modules) under plain torch DDP, bf16 parameters, AdamW
           (fused on GPU), clip_grad_norm_ 1.0. bf16 parameters (no fp32 master) are lighter and faster than the fp32 +
           autocast most users ran, so the ratios against it are conservative.

Measured: `--warmup` steps, then `--steps` timed steps (torch.cuda.synchronize around each; a step's time is the
slowest rank's), median step time; peak memory = max over ranks of torch.cuda.max_memory_allocated during the timed
steps (peak reserved too); then `--profile_steps` steps under torch.profiler for the communication share (see
benchmark/timing.py comm_seconds). FLOPs per token: benchmark/flops.py (formula in its docstring).
tokens/s per GPU = (sequences per step x seq over all data-parallel ranks) / median step time / world size.
The record is one JSON file, `OUT/NAME.json`, written by rank 0 (also on failure: `error` holds the message).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

T_START = time.time()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmark import flops as F  # noqa: E402
from benchmark import timing  # noqa: E402
from openmoe.config import OpenMoeConfig, preset  # noqa: E402

KINDS = ("ours", "mixtral", "naive", "fsdp")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--name", required=True, help="record name: OUT/NAME.json")
    p.add_argument("--out", default=os.environ.get("OUT", "outputs/bench"))
    # shape
    p.add_argument("--model", default="8b", help="OpenMoE preset: tiny, base, 8b, 34b")
    p.add_argument("--layers", type=int, default=None, help="truncate to this many decoder layers; off: the preset's")
    p.add_argument("--moe_layer_interval", type=int, default=None,
                   help="every k-th layer is MoE; off: the preset's (8b: 6, so a 2-layer 8b needs 1 or 2)")
    p.add_argument("--family", choices=("openmoe", "llama_moe"), default="openmoe",
                   help="llama_moe: Mixtral's architecture in our code (3-matrix SwiGLU experts, no extra dense "
                        "MLP, top-k renormalised combine, scaled attention)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=4, help="sequences per data-parallel rank per step")
    # parallel layout (ours; mixtral takes ep = world; naive is DDP)
    p.add_argument("--plugin", choices=("ep", "ep_zero", "hybrid"), default="ep")
    p.add_argument("--extra_dp_size", type=int, default=1)
    p.add_argument("--pp_size", type=int, default=1)
    p.add_argument("--ep_size", type=int, default=None, help="hybrid only")
    p.add_argument("--pp_microbatch", type=int, default=1, help="hybrid: pipeline micro-batch size")
    # options of ours
    p.add_argument("--use_kernel", action="store_true", help="grouped-GEMM experts (ep_size 1 only)")
    p.add_argument("--dropless", action="store_true", help="route every token (no capacity)")
    p.add_argument("--activation_checkpointing", action="store_true")
    p.add_argument("--comm_overlap", type=int, default=0,
                   help="ours, capacity mode: pipeline the expert all-to-all with expert compute in N chunks; 0: off")
    p.add_argument("--hierarchical_alltoall", action="store_true", help="ours, capacity mode: two-level all-to-all")
    p.add_argument("--lm_loss_impl", choices=("fused", "fused_compiled", "chunked"), default="fused",
                   help="ours: LM head + loss implementation (run option of the same name)")
    p.add_argument("--compile_blocks", action="store_true",
                   help="ours: regional torch.compile of the decoder blocks' dense parts (run option of the same name)")
    p.add_argument("--lm_head_chunk", type=int, default=0,
                   help="ours: tokens per LM-head/loss chunk (the model option lm_head_chunk_size); 0: the default")
    p.add_argument("--lean_zero", action="store_true",
                   help="ours: ZeRO-1 reduce-scatter and optimizer step on flat buffers (run option of the same name)")
    p.add_argument("--overlap_communication", action="store_true",
                   help="ours: ZeRO reduces the gradients of the step's last micro-batch during its backward, on a "
                        "side stream (run option of the same name)")
    p.add_argument("--adamw_kernel", action="store_true",
                   help="ours, with --lean_zero: the AdamW pass that reads bf16 gradient shards (run option of the "
                        "same name)")
    p.add_argument("--offload_optimizer", action="store_true",
                   help="ours: fp32 masters and Adam moments in host memory, AdamW on the CPU (run option of the same "
                        "name; colossalai's ZeRO-1 step)")
    p.add_argument("--load_balance", action="store_true",
                   help="ours, EP >= 2: the trainer's expert placement rebalancing (run option of the same name): "
                        "router choices counted every step (one all-reduce), experts moved between EP ranks once, "
                        "after warmup step max(warmup - 1, 1) (so the last warmup step runs on the new placement)")
    p.add_argument("--skew_router", type=float, default=0.0,
                   help="ours: tilt every MoE layer's router towards the first half of the experts (EP rank 0's at EP "
                        "2) by this much, benchmark/skewed_router.py's rule on one of the benchmark's own sequences, "
                        "before training; off: 0")
    p.add_argument("--grad_accum", type=int, default=1,
                   help="micro-batches per optimizer step (each of batch_size sequences; every kind, each with its "
                        "own framework's accumulation: our trainer, booster.no_sync, DDP no_sync); tokens/s counts all")
    # measurement
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--profile_steps", type=int, default=2, help="0: skip the communication profile")
    p.add_argument("--trace", action="store_true",
                   help="also write each rank's profiled steps as a gzipped Chrome trace, OUT/NAME.rankR.trace.json.gz "
                        "(benchmark/trace_gaps.py summarizes one; chrome://tracing, Perfetto)")
    p.add_argument("--no_attention_mask", action="store_true",
                   help="feed no attention mask (plain causal attention) instead of the all-ones mask the trainer's "
                        "batches carry; our model turns a mask into an explicit boolean SDPA mask, HF Mixtral drops an "
                        "all-ones one")
    p.add_argument("--gpu_memory_gib", type=float, default=0.0,
                   help="cap what PyTorch's allocator may take on each GPU at this many GiB "
                        "(torch.cuda.set_per_process_memory_fraction), e.g. 78 to run as an 80 GB GPU would; an "
                        "allocation past it fails as out of memory; off: 0")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lora_rank", type=int, default=0, help="ours: LoRA adapters of this rank on the attention and "
                                                             "dense projections, the rest frozen; off: 0")
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args(argv)
    if a.kind != "ours" and (a.use_kernel or a.activation_checkpointing or a.family != "openmoe" or a.comm_overlap
                             or a.hierarchical_alltoall or a.compile_blocks or a.overlap_communication
                             or a.lean_zero or a.lm_head_chunk or a.load_balance or a.adamw_kernel or a.skew_router
                             or a.offload_optimizer):
        p.error("--use_kernel/--activation_checkpointing/--family/--comm_overlap/--hierarchical_alltoall/"
                "--compile_blocks/--overlap_communication/--lean_zero/--lm_head_chunk/--load_balance/--adamw_kernel/"
                "--skew_router/--offload_optimizer are options of --kind ours")
    if a.dropless and a.kind not in ("ours", "fsdp"):
        p.error("--dropless is an option of --kind ours and fsdp (mixtral is dropless anyway; naive needs capacity)")
    if a.kind == "mixtral" and a.plugin != "ep":
        p.error("--kind mixtral runs ColossalAI's Mixtral policy with ep_size = world (--plugin ep) only")
    return a


def model_config(a: argparse.Namespace) -> OpenMoeConfig:
    over = {}
    if a.layers is not None:
        over["num_hidden_layers"] = a.layers
    if a.moe_layer_interval is not None:
        over["moe_layer_interval"] = a.moe_layer_interval
    if a.family == "llama_moe":
        over.update(model_family="llama_moe", router_combine="normalized")
    cfg = preset(a.model, **over)
    if a.seq > cfg.max_position_embeddings:
        cfg = cfg.replace(max_position_embeddings=a.seq)
    if cfg.num_moe_layers == 0:
        raise ValueError(f"{a.model} truncated to {cfg.num_hidden_layers} layers has no MoE layer (every "
                         f"{cfg.moe_layer_interval}th layer is one): pass --moe_layer_interval 1 or 2")
    return cfg


def mixtral_config(cfg: OpenMoeConfig):
    """Mixtral at the OpenMoE shape. Same: vocab, hidden, expert width I, experts, top-k, layers, heads x head_dim
    (24 x 128 at 8B: q_proj 2048 -> 3072), no GQA (num_key_value_heads = heads), RoPE theta, untied LM head, aux-loss
    weight 0.01. Different, as the architectures are: Mixtral's experts are 3-matrix SwiGLU (3 H I weights; OpenMoE's
    double-gated expert has 4 H I), every layer is MoE with no extra dense MLP (OpenMoE adds one after each MoE
    layer), routing is dropless with top-k renormalised weights and a bf16 router (ours: capacity 1.25 with drops, raw
    softmax weights, fp32 router), no router/output z-loss or label smoothing, attention logits scaled by
    1/sqrt(head_dim), full [B, S, V] logits (ours: chunked LM head). FLOPs are counted from each model, so MFU compares
    them fairly; tokens/s does not (OpenMoE does more work per token)."""
    from transformers import MixtralConfig

    if cfg.num_moe_layers != cfg.num_hidden_layers:
        raise ValueError(f"baseline (a) has an MoE block in every layer; use --moe_layer_interval 1 "
                         f"(got {cfg.num_moe_layers} MoE layers of {cfg.num_hidden_layers})")
    m = MixtralConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                      intermediate_size=cfg.expert_intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                      num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
                      head_dim=cfg.head_dim, num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.router_topk,
                      max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
                      rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=False, output_router_logits=True,
                      router_aux_loss_coef=cfg.router_aux_loss_factor, use_cache=False, sliding_window=None,
                      pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
    m._attn_implementation = "sdpa"  # flash-attn is not installed; SDPA picks its flash kernel for causal masks
    return m


@contextlib.contextmanager
def build_on(device: torch.device, dtype: torch.dtype):
    """Create parameters directly on the GPU in bf16: an 8B-shaped model initialises in seconds there, not on CPU."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(old)


def synthetic_batches(vocab: int, rows: int, seq: int, seed: int, n: int = 4, mask: bool = True) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(2, vocab, (rows, seq), generator=g)
        ids[:, 0] = 0  # OpenMoE's BOS is <pad>
        batch = {"input_ids": ids, "labels": ids.clone()}
        if mask:
            batch["attention_mask"] = torch.ones_like(ids)  # what the trainer's padded batches carry
        batches.append(batch)
    return batches


def decay_groups(model: torch.nn.Module, weight_decay: float = 0.0) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


@dataclass
class Bench:
    step: Callable[[int], None]  # one optimizer step on batch i (cycled)
    flops: F.FlopCount
    layout: dict  # plugin, ep, pp, dp, moe_dp
    tokens_per_step: int  # over all ranks
    has_all_to_all: bool
    routing: Callable[[], dict]
    label: str
    notes: list = field(default_factory=list)


def _load_stats(counts: torch.Tensor) -> float:
    """max over layers of (busiest expert's tokens / mean tokens per expert); counts [layers, E]."""
    counts = counts.float()
    return float((counts.max(1).values / counts.mean(1).clamp(min=1e-9)).max())


def _openmoe_routing(outs) -> dict:
    moe = [m for o in outs or [] for m in o.moe]
    if not moe:
        return {}
    counts = torch.stack([m.tokens_per_expert.detach().float().cpu() for m in moe])
    return {"dropped_fraction": sum(float(m.dropped_fraction) for m in moe) / len(moe),
            "max_over_mean_load": _load_stats(counts)}


def ours_layout(a, cfg: OpenMoeConfig, world: int):
    """The trainer's run config for these options and its validated parallel sizes (no process group needed)."""
    from openmoe.parallel.sizes import resolve_sizes
    from openmoe.train.config import RunConfig

    run = RunConfig.from_flat(model_name=a.model, plugin=a.plugin, extra_dp_size=a.extra_dp_size, pp_size=a.pp_size,
                      ep_size=a.ep_size if a.plugin == "hybrid" else None, microbatch_size=a.pp_microbatch,
                      batch_size=a.batch_size, max_length=a.seq, use_kernel=a.use_kernel, dropless=a.dropless,
                      activation_checkpointing=a.activation_checkpointing, lm_loss_impl=a.lm_loss_impl,
                      grad_accum=a.grad_accum, comm_overlap=a.comm_overlap, compile_blocks=a.compile_blocks,
                      overlap_communication=a.overlap_communication, lean_zero=a.lean_zero,
                      load_balance=a.load_balance, load_balance_interval=10**6, adamw_kernel=a.adamw_kernel,
                      offload_optimizer=a.offload_optimizer,
                      hierarchical_alltoall=a.hierarchical_alltoall, precision="bf16", zero_stage=1, lr=a.lr,
                      warmup_steps=1, grad_clip=1.0, seed=a.seed, tensorboard=False, max_steps=10**6,
                      lora_rank=a.lora_rank)
    sizes = resolve_sizes(run, cfg, world)
    if a.use_kernel and sizes.ep > 1 and not a.dropless:
        raise ValueError(f"--use_kernel with ep_size {sizes.ep} changes the dropless expert-parallel path only "
                         f"(capacity buffers run as a bmm); add --dropless or drop --use_kernel")
    return run, sizes


def skew_routers(model, cfg: OpenMoeConfig, seq: int, tilt: float, device) -> list[float]:
    """benchmark/skewed_router.py's tilt of every router towards experts 0..E/2-1, measured on one synthetic sequence,
    then rank 0's router weights on every rank (the ranks must route alike). Returns the share of router choices on
    those experts per MoE layer, on that sequence."""
    from benchmark.skewed_router import tilt_routers
    from openmoe.moe import OpenMoeSparseMLP

    batch = {k: v.to(device) for k, v in synthetic_batches(cfg.vocab_size, 1, seq, seed=3, n=1)[0].items()}
    share = tilt_routers(model, batch, cfg.num_experts // 2, tilt)
    for m in model.modules():
        if isinstance(m, OpenMoeSparseMLP):
            dist.broadcast(m.gate_weight.data, 0)
    return [round(float(x), 3) for x in share]


def build_ours(a, cfg, world: int, device) -> Bench:
    from openmoe.backend.colossal import shard_copies
    from openmoe.parallel.gather import moe_layers
    from openmoe.parallel.load_balance import LayerRebalance, rebalance
    from openmoe.train.builder import build
    from openmoe.train.step import count_expert_load, train_step

    run, sizes = ours_layout(a, cfg, world)
    counted = {}

    def count_flops(model):  # the single-device model, before expert-parallel wrapping
        counted["flops"] = F.openmoe_flops(model, a.seq)
        if a.lm_head_chunk:
            model.apply_options(model.options.replace(lm_head_chunk_size=a.lm_head_chunk))
        if a.skew_router:
            counted["skew"] = skew_routers(model, cfg, a.seq, a.skew_router, device)

    # the trainer's setup sequence, without data or output directory, the model created on the GPU in bf16
    st = build(run, training=False, customize_model=count_flops, init_context=lambda: build_on(device, torch.bfloat16),
               config=cfg)  # the harness's shape (--layers, --moe_layer_interval, --family), not the bare preset
    flops, plugin = counted["flops"], st.boosted.plugin
    booster, model, optimizer = st.booster, st.model, st.optimizer
    model.train()
    batches = synthetic_batches(cfg.vocab_size, a.batch_size, a.seq, seed=1000 * dist.get_rank(plugin.dp_group) + 7,
                                mask=not a.no_attention_mask)
    state = {"outs": None, "skipped": 0, "moves": None}
    move_after = max(a.warmup - 1, 1) - 1  # 0-based index of the step after which experts move (--load_balance)

    def step(i):
        micro = [batches[(i * a.grad_accum + j) % len(batches)] for j in range(a.grad_accum)]
        outs, applied = train_step(model, booster, optimizer, iter(micro), a.grad_accum, device, check_grads=True)
        state["outs"], state["skipped"] = outs, state["skipped"] + (not applied)
        if st.placement is not None:  # what the trainer does per step, and its Rebalancer hook once
            count_expert_load(outs, device, None, st.placement)
            if i == move_after:
                state["moves"] = rebalance(moe_layers(model), st.placement, shard_copies(optimizer))

    def routing():
        moves = {}
        if state["moves"] is not None:  # EP-rank load of the worst MoE layer, counted before the move
            moves = {"rebalanced_after_step": move_after + 1,
                     "ep_rank_max_over_mean_before": max(LayerRebalance.max_over_mean(r.rank_loads_before)
                                                         for r in state["moves"]),
                     "ep_rank_max_over_mean_after": max(LayerRebalance.max_over_mean(r.rank_loads_after)
                                                        for r in state["moves"]),
                     "experts_swapped": sum(len(r.swaps) for r in state["moves"])}
        skew = {"skewed_router_share_first_half": counted["skew"]} if "skew" in counted else {}
        return {**_openmoe_routing(state["outs"]), "skipped_steps": state["skipped"],
                "capacity_factor": 0.0 if a.dropless else cfg.router_capacity_factor_train, **moves, **skew}

    impl = ("grouped GEMM" if a.use_kernel else "bmm") if sizes.ep == 1 else (
        "EP all-to-all + " + ("grouped GEMM" if a.use_kernel else "bmm"))
    routing_mode = "dropless" if a.dropless else f"capacity {cfg.router_capacity_factor_train}"
    family = "" if a.family == "openmoe" else f" {a.family} (Mixtral's architecture)"
    comm = (f", all-to-all overlapped in {a.comm_overlap} chunks" if a.comm_overlap else "") + (
        ", hierarchical all-to-all" if a.hierarchical_alltoall else "")
    lora = f", LoRA rank {a.lora_rank} (base frozen)" if a.lora_rank else ""
    compiled = (", compiled blocks" if a.compile_blocks else "") + (
        ", ZeRO reduction overlapped" if a.overlap_communication else "") + (
        ", lean ZeRO-1" if a.lean_zero else "") + (f", LM-head chunk {a.lm_head_chunk}" if a.lm_head_chunk else "") + (
        ", experts rebalanced" if a.load_balance else "") + (", AdamW kernel" if a.adamw_kernel else "") + (
        ", optimizer state in host memory" if a.offload_optimizer else "") + (
        f", router tilted to the first half of the experts ({a.skew_router:g})" if a.skew_router else "")
    label = f"ours{family} ({impl}, {routing_mode}{comm}{lora}{compiled})"
    layout = {"plugin": a.plugin, "ep": sizes.ep, "pp": sizes.pp, "dp": sizes.dp, "moe_dp": sizes.moe_dp}
    return Bench(step, flops, layout, a.batch_size * a.seq * sizes.dp * a.grad_accum, sizes.ep > 1, routing, label)


def build_mixtral(a, cfg, world: int, device) -> Bench:
    from colossalai.booster import Booster
    from colossalai.booster.plugin import MoeHybridParallelPlugin
    from transformers import MixtralForCausalLM

    mcfg = mixtral_config(cfg)
    plugin = MoeHybridParallelPlugin(tp_size=1, pp_size=1, ep_size=world, zero_stage=1, precision="bf16",
                                     max_norm=1.0)
    torch.manual_seed(a.seed)
    with build_on(device, torch.bfloat16):
        model = MixtralForCausalLM(mcfg)
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"Mixtral attention is '{model.config._attn_implementation}', expected 'sdpa'")
    flops = F.mixtral_flops(model, a.seq)
    optimizer = torch.optim.AdamW(decay_groups(model), lr=a.lr, betas=(0.9, 0.95))
    booster = Booster(plugin=plugin)
    model, optimizer, *_ = booster.boost(model, optimizer)
    model.train()
    batches = synthetic_batches(cfg.vocab_size, a.batch_size, a.seq, seed=1000 * dist.get_rank(plugin.dp_group) + 7,
                                mask=not a.no_attention_mask)
    state = {"router_logits": None}

    def step(i):
        n = a.grad_accum
        for j in range(n):  # ColossalAI's own accumulation API: reduce (ZeRO-1) after the last micro-batch only
            batch = {k: v.to(device) for k, v in batches[(i * n + j) % len(batches)].items()}
            with booster.no_sync(model, optimizer) if j < n - 1 else contextlib.nullcontext():
                out = model(**batch)
                booster.backward(out.loss / n, optimizer)
        optimizer.step()
        optimizer.zero_grad()
        state["router_logits"] = out.router_logits

    def routing():
        logits = state["router_logits"]
        if not logits:
            return {}
        k, e = mcfg.num_experts_per_tok, mcfg.num_local_experts
        counts = torch.stack([torch.bincount(l.detach().float().topk(k, dim=-1).indices.flatten().cpu(), minlength=e)
                              for l in logits])
        return {"dropped_fraction": 0.0, "max_over_mean_load": _load_stats(counts), "capacity_factor": 0.0}

    layout = {"plugin": "MoeHybridParallelPlugin (Mixtral policy)", "ep": world, "pp": 1, "dp": world, "moe_dp": 1}
    label = "baseline a: HF Mixtral + ColossalAI Mixtral policy (dropless)"
    # its EP block calls all_to_all_single even at ep_size 1 (a 1-rank group): that time counts too
    return Bench(step, flops, layout, a.batch_size * a.seq * world * a.grad_accum, True, routing, label)


def build_naive(a, cfg, world: int, device) -> Bench:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from benchmark.naive_moe import naive_model_
    from openmoe.model import OpenMoeForCausalLM

    torch.manual_seed(a.seed)
    with build_on(device, torch.bfloat16):
        model = naive_model_(OpenMoeForCausalLM(cfg))
    flops = F.openmoe_flops(model, a.seq)
    model.train()
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    optimizer = torch.optim.AdamW(decay_groups(model), lr=a.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    batches = synthetic_batches(cfg.vocab_size, a.batch_size, a.seq, seed=1000 * dist.get_rank() + 7,
                                mask=not a.no_attention_mask)
    state = {"outs": None}

    def step(i):
        n = a.grad_accum
        for j in range(n):  # DDP's accumulation: all-reduce after the last micro-batch only
            batch = {k: v.to(device) for k, v in batches[(i * n + j) % len(batches)].items()}
            with ddp.no_sync() if j < n - 1 else contextlib.nullcontext():
                out = ddp(**batch)
                (out.loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["outs"] = [out]

    def routing():
        return {**_openmoe_routing(state["outs"]), "capacity_factor": cfg.router_capacity_factor_train}

    layout = {"plugin": "torch DDP", "ep": 1, "pp": 1, "dp": world, "moe_dp": world}
    label = "baseline b: naive [T,E,C] einsum dispatch + expert loop, DDP, bf16 params"
    return Bench(step, flops, layout, a.batch_size * a.seq * world * a.grad_accum, False, routing, label)


def build_fsdp(a, cfg, world: int, device) -> Bench:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    from benchmark.naive_moe import loop_model_
    from openmoe.model import OpenMoeForCausalLM
    from openmoe.moe import OpenMoeSparseMLP

    torch.manual_seed(a.seed)
    with build_on(device, torch.float32):  # fp32 master weights: fully_shard keeps 1/world of them per rank
        model = OpenMoeForCausalLM(cfg)
        if a.dropless:
            for m in model.modules():
                if isinstance(m, OpenMoeSparseMLP):
                    m.capacity_factor_train = m.capacity_factor_eval = 0.0
        model = loop_model_(model)
    flops = F.openmoe_flops(model, a.seq)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    model.train()
    optimizer = torch.optim.AdamW(decay_groups(model), lr=a.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    batches = synthetic_batches(cfg.vocab_size, a.batch_size, a.seq, seed=1000 * dist.get_rank() + 7,
                                mask=not a.no_attention_mask)
    state = {"outs": None}

    def step(i):
        n = a.grad_accum
        for j in range(n):
            batch = {k: v.to(device) for k, v in batches[(i * n + j) % len(batches)].items()}
            out = model(**batch)
            (out.loss / n).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # the global norm over all shards
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), 1.0, norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["outs"] = [out]

    def routing():
        return {**_openmoe_routing(state["outs"]),
                "capacity_factor": 0.0 if a.dropless else cfg.router_capacity_factor_train}

    layout = {"plugin": "torch FSDP2 (fully_shard)", "ep": 1, "pp": 1, "dp": world, "moe_dp": world}
    mode = "dropless" if a.dropless else f"capacity {cfg.router_capacity_factor_train}"
    label = f"baseline c: per-expert loop, FSDP2 bf16/fp32 master ({mode})"
    return Bench(step, flops, layout, a.batch_size * a.seq * world * a.grad_accum, False, routing, label)


BUILDERS = {"ours": build_ours, "mixtral": build_mixtral, "naive": build_naive, "fsdp": build_fsdp}


def init(kind: str, seed: int) -> tuple[int, int, torch.device]:
    if kind in ("ours", "mixtral"):
        from openmoe.backend.colossal import init_distributed

        return init_distributed(seed)  # colossalai launch (+ the CPU compatibility patches without CUDA)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _reduce(values: list[float], device, op) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def measure(bench: Bench, a, device) -> dict:
    for i in range(a.warmup):
        bench.step(i)
    timing.sync(device)
    timing.reset_peak_memory(device)
    times = []
    for i in range(a.steps):
        timing.sync(device)
        t0 = time.perf_counter()
        bench.step(a.warmup + i)
        timing.sync(device)
        times.append(time.perf_counter() - t0)
    alloc, reserved = timing.peak_memory_gib(device)
    worst = _reduce(times + [alloc or 0.0, reserved or 0.0, timing.host_peak_rss_gib()], device, dist.ReduceOp.MAX)
    times = worst[: a.steps]
    return {"step_times_s": times, "step_time_s": timing.median(times),
            "peak_mem_gib": worst[-3] if alloc is not None else None,
            "peak_reserved_gib": worst[-2] if reserved is not None else None, "host_peak_rss_gib": worst[-1]}


def profile_comm(bench: Bench, a, device, start: int) -> dict:
    """Share of step time in all-to-all (and in all communication), over `profile_steps` steps, summed over ranks."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    c, error, wall = {"a2a_s": 0.0, "comm_s": 0.0, "method": ""}, None, 0.0
    try:
        with torch.profiler.profile(activities=acts) as prof:
            timing.sync(device)
            t0 = time.perf_counter()
            for i in range(a.profile_steps):
                bench.step(start + i)
            timing.sync(device)
            wall = time.perf_counter() - t0
        if a.trace:  # torch gzips what it exports to a .gz path
            prof.export_chrome_trace(os.path.join(a.out, f"{a.name}.rank{dist.get_rank()}.trace.json.gz"))
        c = timing.comm_seconds(prof)
        c["breakdown"] = breakdown(prof, a.profile_steps, device.type == "cuda")
        if dist.get_rank() == 0 and device.type == "cuda":
            print(top_kernels(prof), flush=True)
    except Exception as e:  # the timing above is already recorded; say why this part is missing
        error = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    ok = 0.0 if error else 1.0
    a2a, comm, wall_sum, oks = _reduce([c["a2a_s"], c["comm_s"], wall, ok], device, dist.ReduceOp.SUM)
    if oks < dist.get_world_size():
        return {"a2a_frac": None, "comm_frac": None, "comm_method": f"profile failed: {error or 'on another rank'}"}
    return {"a2a_frac": a2a / wall_sum, "comm_frac": comm / wall_sum, "comm_method": c["method"],
            "profile_step_time_s": wall_sum / dist.get_world_size() / a.profile_steps,
            "profile_breakdown": c.get("breakdown")}


def breakdown(prof, steps: int, gpu: bool, rows: int = 25) -> dict:
    """This rank's time per step (ms; GPU kernel time on a GPU, CPU time otherwise) in each of the trainer's and
    model's named ranges (openmoe.*: forward, backward, grad_check, optimizer_step; attention, moe, lm_head_loss
    inside forward) and in the top operators by self time, with their calls per step. Ranges nest and operators
    overlap ranges: shares, not a partition."""
    total, self_total = (("device_time_total", "self_device_time_total") if gpu
                         else ("cpu_time_total", "self_cpu_time_total"))
    try:
        events = prof.key_averages()
        ranges = {e.key: round(getattr(e, total) / 1e3 / steps, 2) for e in events if e.key.startswith("openmoe.")}
        top = sorted(events, key=lambda e: getattr(e, self_total), reverse=True)[:rows]
        return {"time": "GPU kernel" if gpu else "CPU", "ranges_ms": ranges,
                "top_ops_ms": [[e.key[:90], round(getattr(e, self_total) / 1e3 / steps, 2), e.count / steps]
                               for e in top]}
    except Exception as e:  # informational only; profiler attribute names move between torch versions
        return {"error": f"{type(e).__name__}: {e}"[:200]}


def top_kernels(prof, rows: int = 20) -> str:
    try:
        return prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=80)
    except Exception as e:  # older/newer profiler spelling; the table is informational only
        return f"(no kernel table: {e})"


def versions() -> dict:
    out = {"torch": torch.__version__}
    for mod in ("colossalai", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


def write_record(out_dir: str, name: str, record: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".{name}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, f"{name}.json"))


def run(a) -> dict:
    rank, world, device = init(a.kind, a.seed)
    if a.gpu_memory_gib and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.gpu_memory_gib * 2**30 / total), device)
    base = {"name": a.name, "kind": a.kind, "model": a.model, "gpus": world, "seq": a.seq, "batch_size": a.batch_size,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", **versions()}
    t_init = time.time()
    gemm_peak = timing.gemm_peak_tflops(device)
    cfg = model_config(a)
    options = ("use_kernel", "dropless", "activation_checkpointing", "no_attention_mask", "lm_loss_impl", "grad_accum",
               "comm_overlap", "hierarchical_alltoall", "compile_blocks", "overlap_communication",
               "lean_zero", "lm_head_chunk", "load_balance", "adamw_kernel", "skew_router", "offload_optimizer",
               "gpu_memory_gib")
    base.update(layers=cfg.num_hidden_layers, moe_layers=cfg.num_moe_layers, family=a.family,
                shape=f"{a.model}-L{cfg.num_hidden_layers}", options={k: getattr(a, k) for k in options})
    bench = BUILDERS[a.kind](a, cfg, world, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # init transients (e.g. the full expert tensors before EP slicing)
    t_built = time.time()
    m = measure(bench, a, device)
    t_measured = time.time()
    tps_gpu = bench.tokens_per_step / m["step_time_s"] / world
    flops_per_s_gpu = bench.flops.flops_per_token * tps_gpu
    record = {**base, "label": bench.label, "layout": bench.layout, "warmup": a.warmup, "steps": a.steps,
              "tokens_per_step": bench.tokens_per_step, **m, "tokens_per_s_per_gpu": tps_gpu,
              "tokens_per_s": tps_gpu * world, "flops": bench.flops.to_dict(),
              "model_tflops_per_gpu": flops_per_s_gpu / 1e12, "mfu": F.mfu(flops_per_s_gpu),
              "peak_flops_denominator": F.HOPPER_BF16_PEAK_FLOPS, "gemm_peak_tflops": gemm_peak,
              "vs_gemm_peak": flops_per_s_gpu / 1e12 / gemm_peak if gemm_peak else None,
              # the step's model FLOPs per GPU at the measured GEMM peak: the time the step would take if every FLOP
              # ran as fast as one large bf16 GEMM (the floor the other step time is measured against)
              "gemm_bound_step_s": (bench.flops.flops_per_token * bench.tokens_per_step / world / (gemm_peak * 1e12)
                                    if gemm_peak else None),
              "has_all_to_all": bench.has_all_to_all, "a2a_frac": None, "comm_frac": None, "comm_method": "not run",
              "routing": {"mode": "real (router on the actual hidden states; not forced balanced)", **bench.routing()},
              "seconds": {"startup": t_init - T_START, "build": t_built - t_init, "measure": t_measured - t_built},
              "error": None}
    if rank == 0:
        write_record(a.out, a.name, record)  # timing is safe even if the profile below fails
    if a.profile_steps:
        record.update(profile_comm(bench, a, device, a.warmup + a.steps))
        if not bench.has_all_to_all and record["a2a_frac"] is not None:
            # this layout has no all-to-all; SendRecv kernels here are pipeline p2p (recorded apart)
            record["p2p_frac"], record["a2a_frac"] = record["a2a_frac"], 0.0
    record["seconds"]["total"] = time.time() - T_START
    if rank == 0:
        write_record(a.out, a.name, record)
        print(f"{a.name}: {tps_gpu:,.0f} tokens/s/GPU, {record['model_tflops_per_gpu']:.1f} TFLOP/s/GPU, "
              f"MFU {100 * record['mfu']:.1f}%, peak {record['peak_mem_gib']} GiB, a2a {record['a2a_frac']}",
              flush=True)
    return record


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        run(a)
    except Exception as e:
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:400]
        rank = int(os.environ.get("RANK", 0))
        print(f"[rank {rank}] bench error: {msg}", file=sys.stderr, flush=True)
        traceback.print_exc()
        if rank == 0:
            write_record(a.out, a.name, {"name": a.name, "kind": a.kind, "model": a.model,
                                         "gpus": int(os.environ.get("WORLD_SIZE", 1)), "error": msg})
        sys.stdout.flush()
        os._exit(1)  # no collective teardown after a failure: a peer may be gone or stuck
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
