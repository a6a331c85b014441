"""Every training-benchmark configuration in one run on the same GPU(s), then one table (and a PNG).

    source scripts/offline_env.sh && python3 benchmark/run_train_bench.py --only 1gpu    # 1-GPU rows + MoE-layer bench
    source scripts/offline_env.sh && python3 benchmark/run_train_bench.py --only 2gpu    # 2-GPU rows
    python3 benchmark/run_train_bench.py --list                                            # names, groups, estimates
    python3 benchmark/run_train_bench.py --tiny --jobs 2 --out /tmp/b   # CPU smoke: every kind, tiny, 1 and 2 procs
    python3 benchmark/summarize_bench.py DIR [DIR ...]          # the table again, e.g. over both halves' outputs

Each configuration is its own process group (`python -m torch.distributed.run --standalone --nproc_per_node N
benchmark/train_bench.py ...`; a 1-GPU one as a single process with CUDA_VISIBLE_DEVICES=0 and the RANK/WORLD_SIZE/
MASTER_* variables torchrun would set), with a timeout; one that fails (OOM, error,
timeout) is recorded with its error line and the next one starts. `--budget_s` stops launching when the run would
overrun the lent machine's per-command limit; skipped configurations are recorded as such.
Output (OUT, else ./outputs/bench): NAME.json and NAME.log per configuration, summary.md, tokens_per_gpu.png.
Edit GPU_CONFIGS below to change the table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmark.summarize_bench import summarize  # noqa: E402


@dataclass(frozen=True)
class Config:
    name: str
    nproc: int
    kind: str  # ours | mixtral | naive | micro
    args: tuple[str, ...]
    timeout_s: int = 150
    est_s: int = 45  # typical wall time on H200, for --list and the budget message

    @property
    def groups(self) -> set[str]:
        """Names --only accepts: the config name, '1gpu'/'2gpu', the model ('8b', 'base', 'micro'), model-Ngpu."""
        model = self.name.split("-")[0]
        return {self.name, f"{self.nproc}gpu", model, f"{model}-{self.nproc}gpu", self.kind}


# OpenMoE-8B shape truncated: hidden 2048, expert width 8192 (gate 2x8192), 32 experts top-2, 24 heads x 128, vocab
# 256384, seq 2048; every layer MoE (--moe_layer_interval 1: the preset's 6 would leave a 2- or 4-layer model dense;
# and baseline (a) has MoE in every layer). 4 sequences of 2048 per GPU per step (8,192 tokens), as baseline (a) was
# measured before.
E8 = ("--model", "8b", "--moe_layer_interval", "1", "--seq", "2048")
L2, L4 = ("--layers", "2", "--batch_size", "4"), ("--layers", "4", "--batch_size", "4")
# pipeline 2 x data 1: 8 rows per step (4 per GPU, as above) in 4 micro-batches of 2
L4_PIPE = ("--layers", "4", "--batch_size", "8", "--pp_microbatch", "2")
BASE = ("--model", "base", "--seq", "2048")  # full 12 layers, MoE every 4th (preset)
B8 = ("--batch_size", "8")
NAIVE_STEPS = ("--warmup", "2", "--steps", "4")  # the naive baseline is slow: fewer steps

GPU_CONFIGS = [  # est_s of the 1-GPU rows: wall times measured on an H200 on 2026-11-23 (new rows: estimates)
    # ---- 1 GPU (2 layers: ~5.5B parameters with every layer MoE, ~124 GiB at ZeRO-1's 24 bytes/parameter step peak)
    Config("8b-L2-1gpu-ours-bmm", 1, "ours", E8 + L2 + ("--plugin", "ep"), est_s=32),
    Config("8b-L2-1gpu-mixtral", 1, "mixtral", E8 + L2, est_s=32),
    Config("8b-L2-1gpu-naive", 1, "naive", E8 + L2 + NAIVE_STEPS, est_s=18),
    Config("8b-L2-1gpu-ours-grouped", 1, "ours", E8 + L2 + ("--plugin", "ep", "--use_kernel"), est_s=22),
    Config("8b-L2-1gpu-ours-grouped-dropless", 1, "ours", E8 + L2 + ("--plugin", "ep", "--use_kernel", "--dropless"),
           est_s=23),
    Config("8b-L2-1gpu-ours-llama_moe", 1, "ours",
           E8 + L2 + ("--plugin", "ep", "--family", "llama_moe", "--use_kernel", "--dropless"), est_s=20),
    # the same 8,192-token micro-batches, 8 per optimizer step (a realistic global batch amortises the optimizer
    # update of ~5.5B parameters), and the per-chunk softmax math of the fused LM-head loss compiled
    Config("8b-L2-1gpu-ours-bmm-accum8", 1, "ours", E8 + L2 + ("--plugin", "ep", "--grad_accum", "8"), est_s=45),
    Config("8b-L2-1gpu-ours-grouped-compiled-accum8", 1, "ours",
           E8 + L2 + ("--plugin", "ep", "--use_kernel", "--lm_loss_impl", "fused_compiled", "--grad_accum", "8"),
           est_s=47),
    # the baselines and Mixtral's architecture at the same 8 micro-batches per step, each with its framework's own
    # accumulation (ColossalAI booster.no_sync with ZeRO-1; DDP no_sync): ratios compare equal step sizes
    Config("8b-L2-1gpu-mixtral-accum8", 1, "mixtral", E8 + L2 + ("--grad_accum", "8", "--warmup", "2", "--steps", "4"),
           est_s=45),
    Config("8b-L2-1gpu-naive-accum8", 1, "naive", E8 + L2 + ("--grad_accum", "8") + NAIVE_STEPS, est_s=35),
    Config("8b-L2-1gpu-ours-llama_moe-compiled-accum8", 1, "ours",
           E8 + L2 + ("--plugin", "ep", "--family", "llama_moe", "--use_kernel", "--dropless", "--lm_loss_impl",
                      "fused_compiled", "--grad_accum", "8"), est_s=45),
    # the same 65,536 tokens per optimizer step in 4 micro-batches of 8 sequences (fewer per-micro-batch passes over
    # the 5.5B gradients; more activation memory)
    Config("8b-L2-1gpu-ours-grouped-compiled-b8-accum4", 1, "ours",
           E8 + ("--layers", "2", "--batch_size", "8", "--plugin", "ep", "--use_kernel", "--lm_loss_impl",
                 "fused_compiled", "--grad_accum", "4"), est_s=45),
    Config("micro-moe-layer", 1, "micro", ("--model", "8b", "--tokens", "8192"), timeout_s=120, est_s=10),
    Config("base-1gpu-ours", 1, "ours", BASE + B8 + ("--plugin", "ep"), timeout_s=120, est_s=28),
    # ---- 2 GPUs (4 layers with EP 2 / pipeline 2: each GPU holds two layers' worth of experts)
    Config("8b-L4-2gpu-ours-ep", 2, "ours", E8 + L4 + ("--plugin", "ep")),
    Config("8b-L4-2gpu-mixtral", 2, "mixtral", E8 + L4),
    Config("8b-L4-2gpu-naive", 2, "naive", E8 + L4 + NAIVE_STEPS),
    Config("8b-L4-2gpu-ours-hybrid", 2, "ours",
           E8 + L4_PIPE + ("--plugin", "hybrid", "--pp_size", "2", "--ep_size", "1", "--use_kernel")),
    # ep_zero replicates every expert on both GPUs: only the 2-layer model fits (~77 GiB vs ~140 GiB at 4 layers)
    Config("8b-L2-2gpu-ours-ep_zero", 2, "ours", E8 + L2 + ("--plugin", "ep_zero", "--extra_dp_size", "2",
                                                           "--use_kernel")),
    Config("base-2gpu-ours-ep", 2, "ours", BASE + B8 + ("--plugin", "ep"), timeout_s=120, est_s=30),
    Config("base-2gpu-ours-ep_zero", 2, "ours", BASE + B8 + ("--plugin", "ep_zero", "--extra_dp_size", "2",
                                                             "--use_kernel"), timeout_s=120, est_s=30),
    Config("base-2gpu-ours-hybrid", 2, "ours", BASE + ("--plugin", "hybrid", "--pp_size", "2", "--ep_size", "1",
                                                       "--batch_size", "16", "--pp_microbatch", "4", "--use_kernel"),
           timeout_s=120, est_s=30),
]

# ---- full depth (issue 19): the OpenMoE-8B preset as published: 24 layers, MoE every 6th (4 MoE layers), 11.9B
# parameters; 2 x 2,048-token sequences per GPU per micro-batch, 8 micro-batches per optimizer step (65,536 tokens per
# step over 2 GPUs); every row dropless (no token dropped, so MFU counts only computed tokens), fused compiled head loss
# for ours. est_s: estimates (startup ~40 s, ~2-8 s per step).
F8 = ("--model", "8b", "--seq", "2048", "--batch_size", "2", "--grad_accum", "8", "--dropless")
F8_STEPS = ("--warmup", "2", "--steps", "3", "--profile_steps", "1")
FULL_CONFIGS = [
    Config("8bfull-2gpu-ours-ep-grouped", 2, "ours",
           F8 + F8_STEPS + ("--plugin", "ep", "--use_kernel", "--lm_loss_impl", "fused_compiled"),
           timeout_s=220, est_s=110),
    Config("8bfull-2gpu-fsdp-loop", 2, "fsdp", F8 + ("--warmup", "1", "--steps", "2", "--profile_steps", "1"),
           timeout_s=220, est_s=90),
    Config("8bfull-2gpu-ours-ep-bmm", 2, "ours", F8 + F8_STEPS + ("--plugin", "ep", "--lm_loss_impl", "fused_compiled"),
           timeout_s=220, est_s=110),
    # 4-layer shape (every layer MoE) at the same 65,536-token step: ours vs baseline (a), both dropless
    Config("8bL4acc-2gpu-ours-ep-grouped", 2, "ours",
           E8 + ("--layers", "4", "--batch_size", "2", "--grad_accum", "8", "--dropless", "--plugin", "ep",
                 "--use_kernel", "--lm_loss_impl", "fused_compiled", "--warmup", "2", "--steps", "3",
                 "--profile_steps", "0"), timeout_s=80, est_s=45),
    Config("8bL4acc-2gpu-mixtral", 2, "mixtral",
           E8 + ("--layers", "4", "--batch_size", "2", "--grad_accum", "8", "--warmup", "2", "--steps", "3",
                 "--profile_steps", "0"), timeout_s=80, est_s=45),
    # pipeline 2 x EP 1: 12 layers (2 MoE) per GPU, every stage holds its experts whole; 32 sequences per step in 16
    # pipeline micro-batches of 2 = the same 65,536 tokens per step
    Config("8bfull-2gpu-ours-hybrid", 2, "ours",
           ("--model", "8b", "--seq", "2048", "--batch_size", "32", "--pp_microbatch", "2",
            "--dropless", "--plugin", "hybrid", "--pp_size", "2", "--ep_size", "1", "--use_kernel",
            "--lm_loss_impl", "fused_compiled") + F8_STEPS, timeout_s=220, est_s=110),
]

# ---- issue 19 speed levers, the same full-depth step (65,536 tokens, dropless): --compile_blocks (regional
# torch.compile of the dense blocks) at 2 x 8 and at 4 sequences x 4 micro-batches (fewer passes over the 7.6B
# per-GPU gradients per step, from the memory the compiled blocks save), the eager row again as the same-run
# reference, the 4-layer shape against baseline (a)'s recorded row, baseline (c), and one memory row (full
# activation checkpointing, 8 x 2: the memory floor). scripts/gpu_issue19_speed.sh runs them in this order.
# the rows below run our compiled blocks with grouped dropless experts over EP 2: the full 8B at 4 sequences x 4
# micro-batches, and the 4-layer shape (every layer MoE) at `batch` sequences x `accum` micro-batches
F8_B4X4 = ("--model", "8b", "--seq", "2048", "--batch_size", "4", "--grad_accum", "4", "--dropless", "--plugin", "ep",
           "--use_kernel", "--lm_loss_impl", "fused_compiled", "--compile_blocks")


def l4_compiled(batch: int, accum: int) -> tuple[str, ...]:
    return E8 + ("--layers", "4", "--batch_size", str(batch), "--grad_accum", str(accum), "--dropless", "--plugin",
                 "ep", "--use_kernel", "--lm_loss_impl", "fused_compiled", "--compile_blocks")


def lean(prefix: tuple[str, ...], *extra: str, warmup: int = 2, steps: int = 3, profile: int = 0) -> tuple[str, ...]:
    """A row of ours with --lean_zero: `prefix` (F8_B4X4 or l4_compiled(...)), --lean_zero, `extra`, the measurement."""
    return prefix + ("--lean_zero", *extra, "--warmup", str(warmup), "--steps", str(steps), "--profile_steps",
                     str(profile))


def offload_80g(accum: int, warmup: int, steps: int, lean_step: bool = True) -> tuple[str, ...]:
    """The full 8B at 4 sequences x `accum` micro-batches with --offload_optimizer, each GPU's allocator capped at 78
    GiB (what an 80 GB GPU leaves after the CUDA context and NCCL); the lean step (the trainer's default) or
    colossalai's."""
    return ("--model", "8b", "--seq", "2048", "--batch_size", "4", "--grad_accum", str(accum), "--dropless",
            "--plugin", "ep", "--use_kernel", "--lm_loss_impl", "fused_compiled", "--compile_blocks",
            "--offload_optimizer", "--gpu_memory_gib", "78", "--warmup", str(warmup), "--steps", str(steps),
            "--profile_steps", "0") + (("--lean_zero",) if lean_step else ())


def l8_1gpu(*extra: str) -> tuple[str, ...]:
    """OpenMoE-8B truncated to 8 layers on one GPU, 4 sequences x 4 micro-batches, grouped dropless experts."""
    return ("--model", "8b", "--layers", "8", "--seq", "2048", "--batch_size", "4", "--grad_accum", "4",
            "--dropless", "--plugin", "ep", "--use_kernel", "--lm_loss_impl", "fused_compiled", "--compile_blocks",
            *extra, "--warmup", "2", "--steps", "3", "--profile_steps", "0")


def l4_mixtral(batch: int, accum: int, warmup: int = 2, steps: int = 3) -> tuple[str, ...]:
    """Baseline (a) at the 4-layer shape, `batch` sequences x `accum` micro-batches."""
    return E8 + ("--layers", "4", "--batch_size", str(batch), "--grad_accum", str(accum), "--warmup", str(warmup),
                 "--steps", str(steps), "--profile_steps", "0")


SPEED_CONFIGS = [
    Config("8bfull-2gpu-ours-ep-compiled", 2, "ours",
           F8 + F8_STEPS + ("--plugin", "ep", "--use_kernel", "--lm_loss_impl", "fused_compiled", "--compile_blocks"),
           timeout_s=240, est_s=120),
    Config("8bfull-2gpu-ours-ep-compiled-b4x4", 2, "ours",
           F8_B4X4 + ("--warmup", "2", "--steps", "3", "--profile_steps", "0"), timeout_s=200, est_s=80),
    Config("8bfull-2gpu-ours-ep-eager", 2, "ours",
           F8 + ("--warmup", "2", "--steps", "3", "--profile_steps", "0", "--plugin", "ep", "--use_kernel",
                 "--lm_loss_impl", "fused_compiled"), timeout_s=200, est_s=80),
    Config("8bL4acc-2gpu-ours-ep-compiled", 2, "ours",
           l4_compiled(2, 8) + ("--warmup", "2", "--steps", "3", "--profile_steps", "0"), timeout_s=120, est_s=50),
    Config("8bfull-2gpu-fsdp-loop-again", 2, "fsdp", F8 + ("--warmup", "1", "--steps", "2", "--profile_steps", "0"),
           timeout_s=200, est_s=80),
    # the same two shapes with ZeRO's reduction of the last micro-batch overlapped with its backward
    Config("8bfull-2gpu-ours-ep-compiled-b4x4-ovl", 2, "ours",
           F8_B4X4 + ("--overlap_communication", "--warmup", "2", "--steps", "3", "--profile_steps", "1"),
           timeout_s=200, est_s=90),
    Config("8bfull-2gpu-ours-ep-compiled-ovl", 2, "ours",
           F8 + ("--warmup", "2", "--steps", "3", "--profile_steps", "0", "--plugin", "ep", "--use_kernel",
                 "--lm_loss_impl", "fused_compiled", "--compile_blocks", "--overlap_communication"),
           timeout_s=200, est_s=70),
    # --lean_zero (ZeRO-1 reduce-scatter and a flat-buffer optimizer step, openmoe/backend/colossal.py lean_zero1) on
    # the best full-depth row (also with 4,096-token LM-head chunks instead of 1,024) and on the 4-layer row; run
    # beside their references and baseline (a) again
    Config("8bfull-2gpu-ours-ep-compiled-b4x4-lean", 2, "ours",
           lean(F8_B4X4, profile=1), timeout_s=200, est_s=90),
    Config("8bfull-2gpu-ours-ep-compiled-b4x4-lean-head4k", 2, "ours",
           lean(F8_B4X4, "--lm_head_chunk", "4096"), timeout_s=200, est_s=80),
    Config("8bL4acc-2gpu-ours-ep-compiled-lean", 2, "ours",
           lean(l4_compiled(2, 8), profile=1), timeout_s=120, est_s=55),
    # the same two lean rows with --load_balance: experts moved between the EP ranks once, after the first warmup
    # step, by its router counts (the random routers load one EP rank more; the other waits in the all-to-all)
    Config("8bfull-2gpu-ours-ep-compiled-b4x4-lean-lb", 2, "ours",
           lean(F8_B4X4, "--load_balance", profile=1), timeout_s=200, est_s=90),
    Config("8bL4acc-2gpu-ours-ep-compiled-lean-lb", 2, "ours",
           lean(l4_compiled(2, 8), "--load_balance", profile=1), timeout_s=120, est_s=55),
    # the 4-layer shape's step as 4 sequences x 4 micro-batches (the same 65,536 tokens), ours and baseline (a): each
    # tool at the micro-batch layout that serves it best, compared at an equal step
    Config("8bL4acc-b4x4-2gpu-ours-ep-compiled-lean", 2, "ours",
           lean(l4_compiled(4, 4)), timeout_s=120, est_s=50),
    # --adamw_kernel on the best full-depth rows (the AdamW pass reading bf16 gradient shards)
    Config("8bfull-2gpu-ours-ep-compiled-b4x4-lean-adamk", 2, "ours",
           lean(F8_B4X4, "--adamw_kernel", profile=1), timeout_s=200, est_s=85),
    Config("8bfull-2gpu-ours-ep-compiled-b4x4-lean-head4k-adamk", 2, "ours",
           lean(F8_B4X4, "--lm_head_chunk", "4096", "--adamw_kernel"), timeout_s=200, est_s=75),
    Config("8bL4acc-b4x4-2gpu-mixtral", 2, "mixtral", l4_mixtral(4, 4), timeout_s=100, est_s=45),
    # the 4-layer shape with --adamw_kernel, and at 8 x 2 and 16 x 1 (sequences x micro-batches; each tool's step is
    # the same 65,536 tokens; a layout that does not fit is recorded as such: baseline (a) runs out of memory at 8 x 2)
    Config("8bL4acc-b4x4-2gpu-ours-ep-compiled-lean-adamk", 2, "ours",
           lean(l4_compiled(4, 4), "--adamw_kernel"), timeout_s=120, est_s=50),
    Config("8bL4acc-b8x2-2gpu-ours-ep-compiled-lean-adamk", 2, "ours",
           lean(l4_compiled(8, 2), "--adamw_kernel"), timeout_s=120, est_s=50),
    Config("8bL4acc-b16x1-2gpu-ours-ep-compiled-lean-adamk", 2, "ours",
           lean(l4_compiled(16, 1), "--adamw_kernel"), timeout_s=120, est_s=50),
    Config("8bL4acc-b16x1-2gpu-ours-ep-compiled-lean-head4k-adamk", 2, "ours",
           lean(l4_compiled(16, 1), "--lm_head_chunk", "4096", "--adamw_kernel"), timeout_s=120, est_s=50),
    # steady state: baseline (a)'s step time still falls over its first timed steps (e.g. 1.51, 1.38, 1.28 s after 2
    # warmup steps), so the comparison rows run 6 warmup and 5 timed steps, both tools
    Config("8bL4acc-b4x4-2gpu-mixtral-steady", 2, "mixtral", l4_mixtral(4, 4, warmup=6, steps=5), timeout_s=120,
           est_s=55),
    Config("8bL4acc-b4x4-2gpu-ours-ep-compiled-lean-adamk-steady", 2, "ours",
           lean(l4_compiled(4, 4), "--adamw_kernel", warmup=6, steps=5), timeout_s=120, est_s=55),
    Config("8bL4acc-b16x1-2gpu-ours-ep-compiled-lean-head4k-adamk-steady", 2, "ours",
           lean(l4_compiled(16, 1), "--lm_head_chunk", "4096", "--adamw_kernel", warmup=6, steps=5), timeout_s=120,
           est_s=55),
    # session 9: does baseline (a) settle after 12 warmup steps; ours with 8k head chunks; ours with the experts
    # moved once by the first step's load (the random routers load one EP rank ~10% more: the other waits)
    Config("8bL4acc-b4x4-2gpu-mixtral-steady12", 2, "mixtral", l4_mixtral(4, 4, warmup=12, steps=5), timeout_s=150,
           est_s=65),
    Config("8bL4acc-b16x1-2gpu-ours-ep-compiled-lean-head8k-adamk-steady", 2, "ours",
           lean(l4_compiled(16, 1), "--lm_head_chunk", "8192", "--adamw_kernel", warmup=6, steps=5), timeout_s=120,
           est_s=55),
    Config("8bL4acc-b16x1-2gpu-ours-ep-compiled-lean-head4k-adamk-lb-steady", 2, "ours",
           lean(l4_compiled(16, 1), "--lm_head_chunk", "4096", "--adamw_kernel", "--load_balance", warmup=6, steps=5),
           timeout_s=120, est_s=55),
    Config("8bL4acc-b8x2-2gpu-mixtral", 2, "mixtral", l4_mixtral(8, 2), timeout_s=100, est_s=45),
    # session 10: the full 8B on GPUs of 80 GB (the allocator capped at 78 GiB of each H200) with --offload_optimizer
    # (fp32 masters and Adam moments in host memory, AdamW on the host): colossalai's ZeRO-1 step (fp32 copies per
    # parameter), and the lean step (bf16 copies per bucket through pinned memory) at the 65,536-token step and at
    # 4 x 16 (262,144 tokens: the host step amortized over 4x the tokens)
    Config("8bfull-2gpu-ours-ep-compiled-b4x4-offload-80g", 2, "ours", offload_80g(4, 2, 3, lean_step=False),
           timeout_s=330, est_s=150),
    Config("8bfull-2gpu-ours-ep-compiled-b4x4-lean-offload-80g", 2, "ours", offload_80g(4, 2, 3),
           timeout_s=240, est_s=110),
    Config("8bfull-2gpu-ours-ep-compiled-b4x16-lean-offload-80g", 2, "ours", offload_80g(16, 1, 2),
           timeout_s=300, est_s=140),
    # the same three steps on one GPU at 8 layers (one MoE layer, 3.3B parameters: what a 128 GiB host holds the
    # state of), beside the lean step with the state on the GPU: what the host step costs
    Config("8bL8-1gpu-ours-compiled-b4x4-offload", 1, "ours", l8_1gpu("--offload_optimizer"), timeout_s=200, est_s=90),
    Config("8bL8-1gpu-ours-compiled-b4x4-lean-offload", 1, "ours", l8_1gpu("--offload_optimizer", "--lean_zero"),
           timeout_s=200, est_s=80),
    Config("8bL8-1gpu-ours-compiled-b4x4-lean", 1, "ours", l8_1gpu("--lean_zero"), timeout_s=200, est_s=70),
    Config("8bfull-2gpu-ours-ep-compiled-ac-b8x2", 2, "ours",
           ("--model", "8b", "--seq", "2048", "--batch_size", "8", "--grad_accum", "2", "--dropless", "--plugin", "ep",
            "--use_kernel", "--lm_loss_impl", "fused_compiled", "--compile_blocks", "--activation_checkpointing",
            "--warmup", "2", "--steps", "2", "--profile_steps", "0"), timeout_s=150, est_s=70),
]

# ---- emulated slow link (issue 19, item 3): run with NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 (NCCL's socket transport
# between the two GPUs of one host, as between nodes): capacity routing (equal splits, what --comm_overlap needs),
# plain all-to-all vs --comm_overlap 4, at OpenMoE-base (12 layers, MoE every 4th; 8 x 2,048 tokens per GPU per step)
# and at the full 8B (the step above, capacity 1.25 instead of dropless). scripts/gpu_slow_link.sh runs them.
S8 = ("--model", "8b", "--seq", "2048", "--batch_size", "2", "--grad_accum", "8", "--plugin", "ep", "--lm_loss_impl",
      "fused_compiled", "--warmup", "1", "--steps", "2", "--profile_steps", "1")
SB = BASE + B8 + ("--plugin", "ep", "--warmup", "2", "--steps", "5", "--profile_steps", "1")
SLOW_CONFIGS = [
    Config("slow-base-2gpu-ours-ep", 2, "ours", SB, timeout_s=120, est_s=40),
    Config("slow-base-2gpu-ours-ep-overlap4", 2, "ours", SB + ("--comm_overlap", "4"), timeout_s=120, est_s=40),
    Config("slow-8bfull-2gpu-ours-ep", 2, "ours", S8, timeout_s=170, est_s=90),
    Config("slow-8bfull-2gpu-ours-ep-overlap4", 2, "ours", S8 + ("--comm_overlap", "4"), timeout_s=170, est_s=90),
    # the fastest NVLink configuration (dropless, compiled blocks, 4 x 4) over the slow link, with ColossalAI's ZeRO-1
    # step (gradient all-reduce, then a parameter all-gather) and with --lean_zero (reduce-scatter + all-gather: 2
    # passes of the dense parameters over the link instead of 3) and its AdamW kernel
    Config("slow-8bfull-2gpu-ours-ep-b4x4", 2, "ours",
           F8_B4X4 + ("--warmup", "1", "--steps", "2", "--profile_steps", "1"), timeout_s=240, est_s=100),
    Config("slow-8bfull-2gpu-ours-ep-b4x4-lean-adamk", 2, "ours",
           lean(F8_B4X4, "--adamw_kernel", warmup=1, steps=2, profile=1),
           timeout_s=240, est_s=100),
    # item 3's load balancing at full depth: the same step with every router tilted to EP rank 0's experts
    # (--skew_router 2, benchmark/skewed_router.py's rule), without and with --load_balance (one move of experts and
    # their optimizer state after the first warmup step, not timed)
    Config("slow-8bfull-2gpu-ours-ep-b4x4-lean-adamk-skew", 2, "ours",
           lean(F8_B4X4, "--adamw_kernel", "--skew_router", "2", steps=2), timeout_s=200, est_s=90),
    Config("slow-8bfull-2gpu-ours-ep-b4x4-lean-adamk-skew-lb", 2, "ours",
           lean(F8_B4X4, "--adamw_kernel", "--skew_router", "2", "--load_balance", steps=2), timeout_s=200, est_s=90),
]

TINY = ("--model", "tiny", "--seq", "64", "--batch_size", "2", "--warmup", "1", "--steps", "2", "--profile_steps", "1")
TINY_MIXTRAL = TINY + ("--moe_layer_interval", "1")
TINY_CONFIGS = [
    Config("tiny-1p-ours", 1, "ours", TINY + ("--plugin", "ep", "--use_kernel"), timeout_s=150),
    Config("tiny-1p-mixtral", 1, "mixtral", TINY_MIXTRAL, timeout_s=150),
    Config("tiny-1p-naive", 1, "naive", TINY, timeout_s=150),
    # 2 processes: each kind's gradient accumulation path too (2 micro-batches per optimizer step)
    Config("tiny-2p-ours", 2, "ours", TINY + ("--plugin", "ep", "--grad_accum", "2"), timeout_s=150),
    Config("tiny-2p-mixtral", 2, "mixtral", TINY_MIXTRAL + ("--grad_accum", "2"), timeout_s=150),
    Config("tiny-2p-naive", 2, "naive", TINY + ("--grad_accum", "2"), timeout_s=150),
    Config("tiny-2p-ours-grouped-dropless", 2, "ours",
           TINY + ("--plugin", "ep", "--use_kernel", "--dropless", "--grad_accum", "2", "--compile_blocks",
                   "--lean_zero", "--adamw_kernel", "--load_balance", "--skew_router", "3"),
           timeout_s=150),
    Config("tiny-2p-ours-overlap", 2, "ours", TINY + ("--plugin", "ep", "--comm_overlap", "2", "--grad_accum", "2"),
           timeout_s=150),
    Config("tiny-2p-fsdp", 2, "fsdp", TINY + ("--grad_accum", "2", "--dropless"), timeout_s=150),
    Config("tiny-micro", 1, "micro", ("--model", "tiny", "--tokens", "128", "--iters", "1", "--warmup", "1"),
           timeout_s=150),
]


def command(cfg: Config, out: str) -> list[str]:
    py = sys.executable
    if cfg.kind == "micro":
        return [py, os.path.join(ROOT, "benchmark", "moe_layer_bench.py"), *cfg.args, "--name", cfg.name, "--out", out]
    script = [os.path.join(ROOT, "benchmark", "train_bench.py"), "--kind", cfg.kind, "--name", cfg.name, "--out", out,
              *cfg.args]
    if cfg.nproc == 1:  # what torchrun would set up for one process (launch_env), without the launcher's seconds
        return [py, *script]
    return [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cfg.nproc), *script]


def launch_env(cfg: Config) -> dict:
    env = dict(os.environ)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation near the memory limit
    env.setdefault("OMP_NUM_THREADS", "1")
    if cfg.nproc == 1:
        env["CUDA_VISIBLE_DEVICES"] = "0"
        if cfg.kind != "micro":
            env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", GROUP_RANK="0",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_line(log: str) -> str:
    """The most telling line of a failed run's log: our own 'bench error:' line, else the last exception line."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for pattern in (r"bench error: (.*)", r"^(\w+(Error|Exception)\b.*)$", r"(error.*)"):
        hits = [m.group(1) for ln in lines if (m := re.search(pattern, ln, re.IGNORECASE))]
        if hits:
            return hits[-1][:400]
    return lines[-1][:400] if lines else "no output"


def read_record(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def descendants(pid: int) -> list[int]:
    """PIDs of every process below `pid` (Linux /proc). torchrun starts its workers in sessions of their own, so
    signalling the launcher's process group does not reach them."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop(proc: subprocess.Popen) -> int | None:
    """End a timed-out launch and everything it started (by PID): SIGTERM, 20 s grace, then SIGKILL. Workers that
    stayed alive would hold GPU memory and starve the next configuration."""
    pids = [proc.pid] + descendants(proc.pid)
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and _alive(pids):
            time.sleep(0.2)
        if not _alive(pids):
            break
    return proc.wait()


def _alive(pids: list[int]) -> bool:
    """Any of pids still running (a zombie waiting to be reaped counts as ended)."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    return True
        except OSError:
            continue
    return False


def run_one(cfg: Config, out: str, timeout: float) -> dict:
    record_path, log_path = os.path.join(out, f"{cfg.name}.json"), os.path.join(out, f"{cfg.name}.log")
    if os.path.exists(record_path):
        os.remove(record_path)  # never report a previous run's figures
    env = launch_env(cfg)
    start, timed_out = time.time(), False
    with open(log_path, "w") as log:
        log.write(" ".join(command(cfg, out)) + "\n")
        log.flush()
        proc = subprocess.Popen(command(cfg, out), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            rc = stop(proc)
    wall = time.time() - start
    record = read_record(record_path)
    if rc != 0 or record is None:
        with open(log_path, errors="replace") as f:
            reason = f"timed out after {timeout:.0f} s" if timed_out else error_line(f.read())
        if record is not None and "tokens_per_s_per_gpu" in record and not record.get("error"):
            # the timed steps were recorded before the communication profile: keep them, say what is missing
            record["note"] = f"failed after the timed steps ({reason}); all-to-all share missing"
        else:
            record = {**(record or {}), "name": cfg.name, "kind": cfg.kind, "gpus": cfg.nproc,
                      "error": (record or {}).get("error") or reason}
    record.update(wall_s=wall, exit_code=rc, command=" ".join(command(cfg, out)))
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    return record


def select(configs: list[Config], only: str | None) -> list[Config]:
    if not only:
        return configs
    wanted = {w.strip() for w in only.split(",") if w.strip()}
    chosen = [c for c in configs if c.groups & wanted]
    unknown = wanted - set().union(*(c.groups for c in configs))
    if unknown:
        raise SystemExit(f"--only: unknown name(s) {sorted(unknown)}; accepted: "
                         f"{sorted(set().union(*(c.groups for c in configs)))}")
    return chosen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "outputs", "bench"))
    p.add_argument("--only", help="comma-separated names or groups (1gpu, 2gpu, 8b, base, micro, 8b-1gpu, a config "
                                  "name, a kind: ours/mixtral/naive)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke configurations instead of the GPU table")
    p.add_argument("--budget_s", type=float, default=560, help="stop launching configurations after this long")
    p.add_argument("--list", action="store_true")
    p.add_argument("--jobs", type=int, default=1, help="with --tiny: configurations run at a time (CPU smoke only)")
    a = p.parse_args(argv)
    configs = select(TINY_CONFIGS if a.tiny else GPU_CONFIGS + FULL_CONFIGS + SPEED_CONFIGS + SLOW_CONFIGS, a.only)
    if a.list:
        for c in configs:
            print(f"{c.name:36} {c.nproc} proc  ~{c.est_s:3d} s (timeout {c.timeout_s} s)  {' '.join(c.args)}")
        print(f"total ~{sum(c.est_s for c in configs)} s")
        return 0
    if a.jobs > 1 and not a.tiny:
        raise SystemExit("--jobs > 1 is for the CPU smoke run (--tiny): GPU configurations share the GPUs")
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    print(f"{len(configs)} configurations, ~{sum(c.est_s for c in configs)} s estimated, budget {a.budget_s:.0f} s; "
          f"output in {a.out}", flush=True)

    def one(n_cfg):
        n, cfg = n_cfg
        left = a.budget_s - (time.time() - t0)
        if left < max(25, 0.75 * cfg.est_s):  # it would be killed before finishing: record why it is missing
            rec = {"name": cfg.name, "kind": cfg.kind, "gpus": cfg.nproc,
                   "error": f"skipped: time budget ({a.budget_s:.0f} s, --budget_s) used up"}
            with open(os.path.join(a.out, f"{cfg.name}.json"), "w") as f:
                json.dump(rec, f, indent=1)
            print(f"[{n}/{len(configs)}] {cfg.name}: skipped (budget)", flush=True)
            return
        rec = run_one(cfg, a.out, min(cfg.timeout_s, left))
        status = f"ERROR {rec['error']}" if rec.get("error") else (
            f"ok {rec.get('tokens_per_s_per_gpu', 0):,.0f} tok/s/GPU" if cfg.kind != "micro" else "ok")
        print(f"[{n}/{len(configs)}] {cfg.name}: {status} ({rec['wall_s']:.0f} s; {time.time() - t0:.0f} s total)",
              flush=True)

    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(one, enumerate(configs, 1)))
    summarize([a.out], names=[c.name for c in configs])
    return 0


if __name__ == "__main__":
    sys.exit(main())
