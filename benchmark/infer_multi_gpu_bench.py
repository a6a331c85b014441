"""Decode speed of the multi-GPU inference paths (issue 18): a device map over the GPUs and expert parallelism,
random weights built directly on the GPUs (no checkpoint written), against the memory-bandwidth bound of a step.

    python benchmark/infer_multi_gpu_bench.py --mode device_map --models 8b 34b               # one process, all GPUs
    torchrun --nproc_per_node 2 benchmark/infer_multi_gpu_bench.py --mode ep --models 8b 34b  # experts over 2 GPUs
    python benchmark/infer_multi_gpu_bench.py --mode device_map --models tiny --check         # CPU smoke run
    torchrun --nproc_per_node 2 benchmark/infer_multi_gpu_bench.py --mode ep --models tiny --check   # 2 gloo ranks

Both modes decode with transformers' generate (model.generate(..., fast_decode=False)), as infer.py does for
--device_map and --ep_size: the fast decoder (openmoe/fast_decode.py) runs one device only. bf16 on CUDA (fp32 on
CPU), the checkpoint's eval capacity routing, prompt --prompt_len tokens, --new_tokens greedy tokens, no EOS.
  device_map  the model built on the meta device, placed by accelerate as from_pretrained(device_map="auto")
              places it (memory balanced over the GPUs, whole decoder layers), each module materialised on its GPU
              and initialised there, then dispatched (accelerate hooks move activations between GPUs).
  ep          the meta model's experts sharded over the ranks (inference.shard_experts), then materialised: each
              rank allocates the dense weights (same seed on every rank: replicated) and only its local experts.
              Decoding with synced_gpus. The global batch is split over the ranks as infer.py splits prompts
              (inference.rank_rows: rank r takes rows r, r + W, ..., padded with dummy rows to ceil(B / W), which
              are decoded but not counted).
  decode ms   per decode step: (t(new_tokens) - t(short)) / (new_tokens - short) (infer_fast_bench.measure)
Bandwidth bound (infer_fast_bench.decode_step_bytes: touched weights once + KV cache, bf16, HBM 4.8 TB/s per GPU):
  device_map  layers run one GPU after the other, so one GPU's bandwidth reads the single-device bytes(B):
              bound = B / (bytes(B) / HBM)
  ep          the ranks read in parallel, each the dense weights and its 1/ep share of the experts touched by the
              T tokens routed per step over all ranks, plus the KV cache of its own rows:
              bytes_rank = 2 * [P_dense + L_moe * E_hit(T) / ep * P_expert] + KV(rows per rank);
              bound = real rows / (bytes_rank / HBM). The all-to-all (2 per MoE layer per step) is not in the bound.
--check: the greedy tokens against a single-device model holding the same weights (device_map: the state dict
copied to one device; ep: experts gathered to rank 0, which decodes every rank's rows alone), as a fraction equal.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmark.infer_fast_bench import H200_HBM_BYTES_PER_S, decode_step_bytes, measure, param_counts  # noqa: E402
from openmoe import OpenMoeForCausalLM, inference, preset  # noqa: E402


def meta_model(name: str, dtype: torch.dtype) -> OpenMoeForCausalLM:
    """The architecture with no storage yet (parameters on the meta device, in `dtype`)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = OpenMoeForCausalLM(preset(name), init=False)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def init_random(model: OpenMoeForCausalLM, seed: int, expert_seed: int) -> None:
    """The model's own init (model.reset_parameters) from `seed`; expert-parallel layers, which that init does not
    know, get the same distributions: the router from `seed` (replicated: equal on every rank), the local experts
    from `expert_seed` (per rank: each holds different experts)."""
    from openmoe.parallel.expert_parallel import ExpertParallelMoE

    torch.manual_seed(seed)
    model.reset_parameters()
    cfg, gen = model.config, torch.Generator(device=model.lm_head.weight.device).manual_seed(expert_seed)
    std = cfg.initializer_range
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ExpertParallelMoE):  # mirrors _init_weights' OpenMoeSparseMLP branch
                m.gate_weight.normal_(0.0, std)  # the global generator, seeded alike on every rank
                m.experts.wi_gate.normal_(0.0, std, generator=gen)
                m.experts.wi_up.normal_(0.0, std, generator=gen)
                m.experts.wo.normal_(0.0, std / (2 * cfg.num_hidden_layers) ** 0.5, generator=gen)


def build_device_map(name: str, dtype: torch.dtype, seed: int) -> OpenMoeForCausalLM:
    """Random weights placed as from_pretrained(device_map="auto") places a checkpoint, each module initialised on
    its own device; the map is in model.hf_device_map."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    model = meta_model(name, dtype)
    no_split = model._no_split_modules
    budget = get_balanced_memory(model, dtype=dtype, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype)
    if any(d == "disk" for d in device_map.values()):
        raise ValueError(f"{name} does not fit the GPUs and CPU memory: {device_map}")
    for module_name, device in device_map.items():
        target = model.get_submodule(module_name) if module_name else model
        target.to_empty(device=f"cuda:{device}" if isinstance(device, int) else device)
    init_random(model, seed, seed)
    return dispatch_model(model, device_map)


def build_ep(name: str, dtype: torch.dtype, seed: int, device: torch.device) -> OpenMoeForCausalLM:
    """Experts sharded over the world on the meta model, then this rank's share materialised on `device`."""
    import torch.distributed as dist

    model = meta_model(name, dtype)
    inference.shard_experts(model, dist.group.WORLD)
    model.to_empty(device=device)
    init_random(model, seed, seed + 1 + dist.get_rank())
    return model


def step_bound(config, counts: dict, mode: str, batch: int, world: int, context: float) -> tuple[float, float]:
    """(bytes the busiest GPU reads per decode step, tokens/s bound) for `batch` real rows (module docstring)."""
    if mode == "device_map":
        step = decode_step_bytes(config, counts, batch, context)
        return step, batch * H200_HBM_BYTES_PER_S / step
    rows = len(inference.rank_rows(batch, 0, world)[0])  # every rank decodes ceil(B / W) rows, dummies included
    tokens = rows * world  # routed per step over all ranks, dummy rows included
    weights = decode_step_bytes(config, {"dense": counts["dense"], "expert": counts["expert"] / world}, tokens, 0)
    kv = decode_step_bytes(config, {"dense": 0, "expert": 0}, rows, context)
    return weights + kv, batch * H200_HBM_BYTES_PER_S / (weights + kv)


def reference_tokens(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0, fast_decode=False)


def check_device_map(model, name: str, ids: torch.Tensor, out: torch.Tensor, new_tokens: int) -> float:
    """Fraction of greedy tokens equal to a single-device model holding the dispatched model's weights."""
    single = OpenMoeForCausalLM(preset(name), init=False).to(model.dtype).eval()
    single.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    want = reference_tokens(single, ids.cpu(), new_tokens)
    return (out.cpu() == want).float().mean().item()


def check_ep(model, name: str, ids: torch.Tensor, outs: list, batch: int, new_tokens: int) -> float | None:
    """Rank 0 gathers the experts into a single-device model and decodes each rank's rows alone (its capacity is
    computed from the local rows, as the EP layer computes it); fraction of greedy tokens equal to what the ranks
    gave. None on other ranks. Collective."""
    import torch.distributed as dist

    from openmoe.parallel.gather import gather_experts

    full = gather_experts(model, {k: v.detach() for k, v in model.state_dict().items()})
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, [o.cpu() for o in outs])
    if dist.get_rank() != 0:
        return None
    single = OpenMoeForCausalLM(preset(name), init=False).to(model.lm_head.weight.dtype).eval()
    single.load_state_dict({k: v.cpu() for k, v in full.items()})
    same = total = 0
    for rank, got in enumerate(gathered):
        want = reference_tokens(single, ids[inference.rank_rows(batch, rank, len(gathered))[0]].cpu(), new_tokens)
        same += (got[0] == want).sum().item()
        total += want.numel()
    return same / total


def run_model(name: str, a, rank: int, world: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    counts = param_counts(meta_model(name, dtype))
    gpus = [] if device.type != "cuda" else (
        list(range(torch.cuda.device_count())) if a.mode == "device_map" else [device.index])
    for i in gpus:
        torch.cuda.reset_peak_memory_stats(i)
    model = build_device_map(name, dtype, a.seed) if a.mode == "device_map" else build_ep(name, dtype, a.seed,
                                                                                           device)
    cfg, rows = model.config, []
    first = inference.input_device(model) if a.mode == "device_map" else device
    # device -> entries of the map placed there (decoder layers, plus embedding / norm / head)
    placement = dict(Counter(str(d) for d in model.hf_device_map.values())) if a.mode == "device_map" else None
    for batch in a.batch_sizes:
        gen = torch.Generator().manual_seed(a.seed + batch)
        ids = torch.randint(3, min(32000, cfg.vocab_size), (batch, a.prompt_len), generator=gen)
        ids[:, 0] = 0  # <pad>-BOS
        mine = ids if a.mode == "device_map" else ids[inference.rank_rows(batch, rank, world)[0]]
        mine = mine.to(first)
        mask = torch.ones_like(mine)

        def generate(x, n):
            return model.generate(x, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None,
                                  pad_token_id=0, synced_gpus=world > 1, fast_decode=False)

        if world > 1:
            torch.distributed.barrier()
        t_long, per_step, out = measure(generate, mine, a.new_tokens, a.short_tokens, first, a.warmup)
        step_bytes, bound = step_bound(cfg, counts, a.mode, batch, world, a.prompt_len + a.new_tokens / 2)
        row = {"model": name, "mode": a.mode, "world": world, "batch": batch,
               "tokens_per_s": batch * a.new_tokens / t_long, "decode_ms_per_step": 1000 * per_step,
               "decode_tokens_per_s": batch / per_step, "bound_GB_per_step_busiest_gpu": step_bytes / 1e9,
               "bound_tokens_per_s": bound, "of_bound": batch / per_step / bound, "params": counts,
               "modules_per_device": placement}
        if a.check:
            if a.mode == "device_map":
                row["token_agreement_with_single_device"] = check_device_map(model, name, ids, out, a.new_tokens)
            else:
                row["token_agreement_with_single_device"] = check_ep(model, name, ids, [out], batch, a.new_tokens)
        if device.type == "cuda":  # this process's GPUs: all of them with a device map, its own under EP
            row["peak_GiB_per_gpu"] = {i: torch.cuda.max_memory_allocated(i) / 2**30 for i in gpus}
        rows.append(row)
        if rank == 0:
            print(f"{name:5s} {a.mode:10s} x{world} batch {batch:3d}: {row['tokens_per_s']:8.1f} tok/s, decode "
                  f"{row['decode_ms_per_step']:7.2f} ms/step = {row['decode_tokens_per_s']:8.1f} tok/s = "
                  f"{100 * row['of_bound']:5.2f}% of bound {bound:8.1f} ({step_bytes / 1e9:.2f} GB/step)"
                  + (f", agreement {row['token_agreement_with_single_device']}" if a.check else ""), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", required=True, choices=["device_map", "ep"])
    p.add_argument("--models", nargs="+", default=["8b", "34b"], help="presets (openmoe/config.py), random weights")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--short_tokens", type=int, default=8, help="second, shorter run that cancels the prefill")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="greedy tokens against a single-device copy (small models)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    a = p.parse_args(argv)
    if a.short_tokens >= a.new_tokens:
        raise SystemExit(f"error: --short_tokens ({a.short_tokens}) must be < --new_tokens ({a.new_tokens})")
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    rank, world, device = 0, 1, torch.device("cuda" if cuda else "cpu")
    if a.mode == "ep":
        world = int(os.environ.get("WORLD_SIZE", 1))
        rank, world = inference.init_expert_parallel(world, "torchrun --nproc_per_node 2 "
                                                            "benchmark/infer_multi_gpu_bench.py --mode ep")
        device = torch.device(f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")
    head = {"mode": a.mode, "world": world, "dtype": str(dtype), "torch": torch.__version__,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
            "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "hbm_bytes_per_s": H200_HBM_BYTES_PER_S}
    rows = []
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"infer_multi_gpu_{a.mode}.json")
    try:
        for name in a.models:
            rows += run_model(name, a, rank, world, device, dtype)
            gc.collect()  # the model went out of scope: give its memory back before the next one is built
            if cuda:
                torch.cuda.empty_cache()
            if rank == 0:
                with open(path, "w") as f:
                    json.dump({**head, "rows": rows}, f, indent=2)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
