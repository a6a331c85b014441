"""Decode speed of HF transformers' `model.generate` against the fast path (openmoe/fast_decode.py), same process,
same weights, against the memory-bandwidth bound of a decode step.

    python benchmark/infer_fast_bench.py --model 8b --batch_sizes 1 16 --compile          # one H200, bf16
    python benchmark/infer_fast_bench.py --model tiny --batch_sizes 1 2 --new_tokens 8     # CPU smoke run
    python benchmark/infer_fast_bench.py --model 8b --check_kernels_only                    # GPU kernel check

Random weights (routing real, not forced balanced), prompt --prompt_len tokens, --new_tokens greedy tokens (no EOS).
Rows: hf generate (transformers' GenerationMixin with its DynamicCache and the checkpoint's eval capacity routing:
the reference, called with fast_decode=False since model.generate routes to the fast decoder on CUDA otherwise; the
model does not support transformers' static cache), fast path uncompiled for each MoE
implementation, fast path through torch.compile(mode="reduce-overhead") for each of --compile_impls (auto: the
Triton expert GEMV up to 8 (token, choice) pairs, the grouped GEMM beyond, on CUDA bf16).
--check_kernels_only: the decode kernels of openmoe/decode_kernels.py and the fused projections against their
references at the model's shapes (expert GEMV vs gathered weights and grouped GEMM; one fused GEMV vs separate
ones), and their device times captured in CUDA graphs (launches excluded); kernel_check.json, exit 1 on a mismatch.
  tokens/s     batch x new tokens / wall time of one generate call (prefill included), after warm-up calls
  decode ms    per decode step: (t(new_tokens) - t(short)) / (new_tokens - short), prefill cancelled out; each t
               the median of 3 calls
  of bound     decode tokens/s / the bandwidth bound below
Bandwidth bound of one decode step (bytes that must cross HBM once, bf16 = 2 bytes per parameter):
  bytes(B) = 2 * [P_dense + L_moe * E_hit(B) * P_expert] + KV(B)
    P_dense   every matmul weight a token passes (attention, dense and extra MLPs, router gates, LM head, norms);
              the embedding table is excluded (B rows are read)
    E_hit(B)  expected distinct experts per MoE layer when B tokens each pick top_k of E uniformly:
              E * (1 - (1 - k/E)^B) (= k at B = 1); "all" rows use E (the issue's 23.8 GB figure counts all experts)
    KV(B)     2 (K, V) * layers * B * N_kv * head_dim * mean context * 2 bytes, mean context = prompt + new / 2
  bound tokens/s = B / (bytes(B) / HBM bandwidth), HBM 4.8 TB/s (H200 datasheet); the measured device-to-device
  copy bandwidth is printed beside it. TTFT: one prompt of --ttft_prompt_len tokens, time to the first new token
  (median of 3 calls).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from openmoe import OpenMoeForCausalLM, preset  # noqa: E402
from openmoe.decode_kernels import (  # noqa: E402
    GemvTiles,
    expert_gemv,
    gathered_experts,
    linear_gemv,
    triton_supported,
)
from openmoe.fast_decode import FastDecoder  # noqa: E402
from openmoe.moe import HAS_GROUPED_MM, LlamaExperts, OpenMoeExperts, grouped_experts  # noqa: E402
from openmoe.router import route  # noqa: E402

H200_HBM_BYTES_PER_S = 4.8e12


def param_counts(model) -> dict:
    """Parameters by role: expert weights (all experts, all MoE layers), embedding table, everything else."""
    experts = embed = rest = 0
    for name, p in model.named_parameters():
        if ".experts." in name:
            experts += p.numel()
        elif name.endswith("embed_tokens.weight"):
            embed += p.numel()
        else:
            rest += p.numel()
    return {"expert": experts, "embedding": embed, "dense": rest}


def experts_hit(num_experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts of one MoE layer touched by `batch` tokens choosing top_k of E uniformly."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def decode_step_bytes(config, counts: dict, batch: int, context: float, all_experts: bool = False,
                      bytes_per_param: int = 2) -> float:
    """Bytes one decode step must read: touched weights once plus the KV cache of `context` tokens per row."""
    moe_layers = config.num_moe_layers
    per_expert = counts["expert"] / (moe_layers * config.num_experts)
    hit = config.num_experts if all_experts else experts_hit(config.num_experts, config.router_topk, batch)
    weights = counts["dense"] + moe_layers * hit * per_expert
    kv = 2 * config.num_hidden_layers * batch * config.num_key_value_heads * config.head_dim * context
    return bytes_per_param * (weights + kv)


def build_model(name: str, device: torch.device, dtype: torch.dtype):
    """Random weights initialised on the device in `dtype` (no fp32 copy of an 8B model on the host)."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = OpenMoeForCausalLM(preset(name))
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def copy_bandwidth(device: torch.device) -> float | None:
    """Measured device-to-device copy, bytes read + written per second (None on CPU)."""
    if device.type != "cuda":
        return None
    x = torch.empty(2**30, dtype=torch.float32, device=device)  # 4 GiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    bw = 10 * 2 * x.numel() * 4 / (time.perf_counter() - t0)
    del x, y
    torch.cuda.empty_cache()
    return bw


def load_decoder_class(path: str):
    """FastDecoder of the module in file `path` (imported under its own name, beside openmoe.fast_decode)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_fast_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FastDecoder


def compiled_decoder(spec: str, model, max_b: int, a, tiles):
    """The compiled decoder of one --compile_impls entry, IMPL[+nodense][+norope][:B] or IMPL+baseline[:B]."""
    impl, *options = spec.partition(":")[0].split("+")
    if not set(options) <= {"nodense", "norope", "baseline"} or ("baseline" in options and len(options) > 1):
        raise SystemExit(f"error: --compile_impls {spec}: accepted IMPL, IMPL+nodense, IMPL+norope, "
                         "IMPL+nodense+norope or IMPL+baseline, each with an optional :B")
    length = a.prompt_len + a.new_tokens
    if "baseline" not in options:
        return FastDecoder(model, max_b, length, moe_impl=impl, compile=True, gemv_tiles=tiles,
                           dense_gemv="nodense" not in options, rope_kernel="norope" not in options)
    if not a.baseline_decoder:
        raise SystemExit(f"error: --compile_impls {spec} needs --baseline_decoder FILE")
    return load_decoder_class(a.baseline_decoder)(model, max_b, length, moe_impl=impl, compile=True)


def wall(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(generate, ids, new_tokens: int, short: int, device, warmup: int,
            repeats: int = 3) -> tuple[float, float, torch.Tensor]:
    """(seconds for new_tokens, seconds per decode step, output ids); each time the median of `repeats` calls."""
    out = None
    for _ in range(warmup):
        out = generate(ids, new_tokens)
        generate(ids, short)
    t_long = sorted(wall(lambda: generate(ids, new_tokens), device) for _ in range(repeats))[repeats // 2]
    t_short = sorted(wall(lambda: generate(ids, short), device) for _ in range(repeats))[repeats // 2]
    return t_long, (t_long - t_short) / (new_tokens - short), out


def continuous_row(model, ids, a, bound, device) -> dict:
    """Decode steps of a SlotDecoder with all len(ids) slots busy: per step = (t(new) - t(short)) / (new - short)."""
    from openmoe.continuous import SlotDecoder

    b, name = ids.shape[0], "continuous" + ("+compile" if a.compile else "")
    try:
        dec = SlotDecoder(model, b, a.prompt_len + 2 * a.new_tokens + a.warmup * (a.new_tokens + a.short_tokens),
                          compile=a.compile)
        for slot in range(b):
            dec.admit(slot, ids[slot].tolist(), dec.max_seq_len - a.prompt_len)
        for _ in range(a.warmup):
            dec.step(a.new_tokens)
            dec.step(a.short_tokens)
        t_long = wall(lambda: dec.step(a.new_tokens), device)
        t_short = wall(lambda: dec.step(a.short_tokens), device)
    except Exception as e:
        return {"batch": b, "path": name, "error": f"{type(e).__name__}: {e}"[:500]}
    per_step = (t_long - t_short) / (a.new_tokens - a.short_tokens)
    return {"batch": b, "path": name, "decode_ms_per_step": 1000 * per_step, "decode_tokens_per_s": b / per_step,
            "bound_tokens_per_s": bound, "of_bound": b / per_step / bound}


def profile_row(name: str, dec, ids, a, device) -> dict:
    """Device time of the kernels of one generate call, per decode step, against its wall time per step: a wall
    time well above the kernel time means the step waits on the host (launches, syncs)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    dec.generate(ids, max_new_tokens=a.new_tokens, eos_token_id=-1)  # warm (and compiled)
    with profile(activities=activities) as prof:
        t = wall(lambda: dec.generate(ids, max_new_tokens=a.new_tokens, eos_token_id=-1), device)
    events = prof.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    kernel_us = sum(getattr(e, attr) for e in events if device.type != "cuda" or e.device_type.name == "CUDA")
    table = events.table(sort_by=attr, row_limit=25)
    with open(os.path.join(a.out, f"profile_{name.replace(' ', '_').replace('+', '_')}.txt"), "w") as f:
        f.write(table)
    return {"batch": 1, "path": f"profile {name}", "wall_ms_per_step_profiled": 1000 * t / a.new_tokens,
            "kernel_ms_per_step": kernel_us / 1000 / a.new_tokens}


def graph_time_us(fn, device, iters: int = 20) -> float | None:
    """Device time per call of fn in µs: `iters` calls captured in one CUDA graph and replayed (no launch
    overhead, as in the compiled decode step). None off CUDA."""
    if device.type != "cuda":
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton JIT, cuBLAS handles) outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (3 * iters)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in fp32: how the checks below compare a kernel with its reference."""
    want = want.float()
    return ((got.float() - want).abs().max() / want.abs().max()).item()


def check_kernels(cfg, device, dtype, out_dir: str) -> bool:
    """Expert GEMV vs its references and fused vs separate projections at cfg's shapes: max error relative to the
    reference's largest magnitude (bf16: the paths round differently, a wrong expert or column is O(1)) and device
    times. Writes kernel_check.json; True when every comparison is within tolerance."""
    torch.manual_seed(0)
    h, i, e, k = cfg.hidden_size, cfg.expert_intermediate_size, cfg.num_experts, cfg.router_topk
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    with device:
        experts = (OpenMoeExperts if cfg.double_gated_mlp else LlamaExperts)(e, h, i).to(dtype)
        for w in (experts.wi_gate, experts.wi_up, experts.wo):
            torch.nn.init.normal_(w, 0.0, cfg.initializer_range)
        gate = torch.randn(e, h)
    rows, ok, best = [], True, GemvTiles()
    with torch.no_grad():
        for t in (1, 2, 4, 16):
            x = torch.randn(t, h, device=device, dtype=dtype)
            r = route(x, gate, k, 0.0, 0, True, size_dropless=False)
            ref = gathered_experts(experts, x, r).float()
            paths = {"gemv": lambda: expert_gemv(experts, x, r), "gather": lambda: gathered_experts(experts, x, r)}
            if HAS_GROUPED_MM and (device.type != "cuda" or dtype == torch.bfloat16):
                paths["grouped"] = lambda: grouped_experts(experts, x, r)
            row = {"check": "experts", "tokens": t, "pairs": t * k, "triton": triton_supported(experts, x),
                   "distinct_experts": int(r.expert_idx.unique().numel())}
            for name, fn in paths.items():
                err = rel_err(fn(), ref)
                ok &= err <= tol
                row[f"{name}_rel_err"] = err
                if name == "gather" and t > 2:  # its [T, K, H, I] copies are slow to time and decide nothing
                    continue
                try:
                    row[f"{name}_us"] = graph_time_us(fn, device)
                except Exception as exc:  # a timing that cannot be captured is reported, not fatal
                    row[f"{name}_us_error"] = f"{type(exc).__name__}: {exc}"[:300]
            # bytes the chosen experts' weights take: what a GEMV-shaped kernel must read
            row["expert_bytes"] = row["distinct_experts"] * sum(
                w[0].numel() * w.element_size() for w in (experts.wi_gate, experts.wi_up, experts.wo))
            rows.append(row)
            if t == 1 and row["triton"]:
                best = sweep_tiles(experts, x, r, ref, tol, device, rows)
        x = torch.randn(1, h, device=device, dtype=dtype)
        groups = {"qkv": [cfg.num_attention_heads * cfg.head_dim] + [cfg.num_key_value_heads * cfg.head_dim] * 2,
                  "gate_up": [(2 if cfg.double_gated_mlp else 1) * cfg.intermediate_size, cfg.intermediate_size]}
        for name, outs in groups.items():
            rot = 8  # distinct weights cycled through, more bytes than the L2 cache holds
            fused = [torch.randn(sum(outs), h, device=device, dtype=dtype) * cfg.initializer_range
                     for _ in range(rot)]
            parts = [list(w.split(outs)) for w in fused]  # row views, as FastDecoder re-lays the parameters
            one = lambda: [torch.nn.functional.linear(x, w) for w in fused]  # noqa: E731
            sep = lambda: [torch.nn.functional.linear(x, p) for ps in parts for p in ps]  # noqa: E731
            whole, split, n = one(), sep(), len(outs)
            err = max(rel_err(torch.cat(split[j * n:(j + 1) * n], -1), whole[j]) for j in range(rot))
            ok &= err <= tol
            t_one, t_sep = graph_time_us(one, device), graph_time_us(sep, device)
            nbytes = sum(outs) * h * x.element_size()
            rows.append({"check": f"fused {name}", "out_features": outs, "rel_err": err,
                         "fused_us": t_one and t_one / rot, "separate_us": t_sep and t_sep / rot,
                         "fused_TBps": t_one and nbytes * rot / t_one / 1e6,
                         "separate_TBps": t_sep and nbytes * rot / t_sep / 1e6})
        if best is not None and triton_supported(experts, x):
            best = sweep_dense_tiles(cfg, device, dtype, tol, rows, best)
            ok &= all(r["rel_err"] <= tol for r in rows if r["check"] == "dense gemv" and "rel_err" in r)
    for row in rows:
        print(json.dumps(row), flush=True)
    with open(os.path.join(out_dir, "kernel_check.json"), "w") as f:
        json.dump({"ok": ok, "tolerance": tol, "best_tiles": dataclasses.asdict(best), "rows": rows}, f, indent=2)
    return ok


DENSE_TILES = [(16, 256, 2, 4), (16, 512, 2, 8), (8, 512, 2, 4), (32, 256, 4, 8), (16, 256, 4, 4), (32, 128, 4, 4),
               (64, 128, 8, 8), (8, 1024, 1, 8), (16, 128, 4, 4), (32, 512, 4, 8)]  # block n, block k, split, warps


def check_rope(cfg, device, dtype, batch: int = 2) -> dict:
    """decode_kernels.rope_qkv_into_cache against apply_rope and indexed cache writes at cfg's shapes (a 64-column
    cache, column 37): max error relative to the largest magnitude of q and of each whole cache (a write to any
    other cell counts as an error)."""
    from openmoe.decode_kernels import rope_qkv_into_cache
    from openmoe.model import apply_rope, rope_cos_sin

    n, n_kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    torch.manual_seed(0)
    qkv = torch.randn(batch, (n + 2 * n_kv) * d, device=device, dtype=dtype)
    cos, sin = rope_cos_sin(torch.randint(0, 500, (batch, 1), device=device), d, cfg.rope_theta, dtype)  # [B, 1, D]
    k_cache, v_cache = (torch.randn(batch + 1, n_kv, 64, d, device=device, dtype=dtype) for _ in range(2))
    want_k, want_v = k_cache.clone(), v_cache.clone()
    q = rope_qkv_into_cache(qkv, cos, sin, k_cache, v_cache, torch.tensor([37], device=device), n, n_kv)
    heads = qkv.view(batch, n + 2 * n_kv, 1, d)
    rot = apply_rope(heads[:, :n + n_kv].float(), cos.float(), sin.float())  # fp32 reference
    want_k[:batch, :, 37] = rot[:, n:, 0].to(dtype)
    want_v[:batch, :, 37] = heads[:, n + n_kv:, 0]
    return {"check": "rope kernel", "q_rel_err": rel_err(q, rot[:, :n]), "k_rel_err": rel_err(k_cache, want_k),
            "v_rel_err": rel_err(v_cache, want_v)}


def sweep_dense_tiles(cfg, device, dtype, tol, rows, best: GemvTiles) -> GemvTiles:
    """One decode row through decode_kernels.linear_gemv against F.linear (cuBLAS) at the o_proj and down_proj
    shapes (and, for comparison, q/k/v and gate/up fused), under each of DENSE_TILES: error and device time per
    call, 8 distinct weights cycled (more bytes than L2). Returns `best` with the dense tiles fastest in sum over
    o_proj and down_proj among the correct ones."""
    h = cfg.hidden_size
    inner = cfg.num_attention_heads * cfg.head_dim
    shapes = {"o_proj": (h, inner), "down_proj": (h, cfg.intermediate_size),
              "qkv": (inner + 2 * cfg.num_key_value_heads * cfg.head_dim, h),
              "gate_up": (((2 if cfg.double_gated_mlp else 1) + 1) * cfg.intermediate_size, h)}
    rot, total = 8, {}
    for name, (n, k) in shapes.items():
        ws = [torch.randn(n, k, device=device, dtype=dtype) * cfg.initializer_range for _ in range(rot)]
        x = torch.randn(1, k, device=device, dtype=dtype)
        refs = [torch.nn.functional.linear(x, w).float() for w in ws]
        t_ref = graph_time_us(lambda: [torch.nn.functional.linear(x, w) for w in ws], device) / rot
        nbytes = n * k * x.element_size()
        rows.append({"check": "dense gemv", "shape": name, "n": n, "k": k, "path": "cublas", "us": t_ref,
                     "TBps": nbytes / t_ref / 1e6})
        for bn, bk, split, warps in DENSE_TILES:
            tiles = dataclasses.replace(best, dense_block_n=bn, dense_block_k=bk, dense_split=split, dense_warps=warps)
            row = {"check": "dense gemv", "shape": name, "n": n, "k": k, "path": "triton",
                   "tiles": [bn, bk, split, warps]}
            try:
                err = max(rel_err(linear_gemv(x, w, tiles), ref) for w, ref in zip(ws, refs))
                us = graph_time_us(lambda: [linear_gemv(x, w, tiles) for w in ws], device) / rot
                row.update(rel_err=err, us=us, TBps=nbytes / us / 1e6, x_cublas=t_ref / us)
                if name in ("o_proj", "down_proj") and err <= tol:
                    total[tiles] = total.get(tiles, 0.0) + us
                elif name in ("o_proj", "down_proj"):
                    total[tiles] = float("inf")
            except Exception as exc:  # a tile choice Triton cannot build is skipped
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                total[tiles] = float("inf")
            rows.append(row)
    good = {t: us for t, us in total.items() if us < float("inf")}
    return min(good, key=good.get) if good else best


def sweep_tiles(experts, x, r, ref, tol, device, rows) -> GemvTiles:
    """Device time of the expert GEMV under a few tile choices (gate/up pass first: fused or split-K; then the down
    kernel with the best gate tiles); the fastest correct one is returned (--gemv_tiles of the benchmark)."""
    def timed(tiles):
        got = expert_gemv(experts, x, r, tiles).float()
        err = rel_err(got, ref)
        us = graph_time_us(lambda: expert_gemv(experts, x, r, tiles), device) if err <= tol else None
        rows.append({"check": "tiles", **dataclasses.asdict(tiles), "rel_err": err, "us": us})
        return float("inf") if us is None else us

    best = GemvTiles()
    for stage in ([{}, {"gate_split": 8}, {"gate_split": 8, "gate_block_n": 64, "gate_block_k": 64},
                   {"gate_split": 4, "gate_block_n": 64}, {"gate_split": 16}],
                  [{}, {"down_split": 16}, {"down_block_n": 64}, {"down_split": 16, "down_block_k": 64}]):
        base, times = best, {}
        for change in stage:
            tiles = dataclasses.replace(base, **change)
            try:
                times[tiles] = timed(tiles)
            except Exception as exc:  # a tile choice Triton cannot build is skipped
                rows.append({"check": "tiles", **dataclasses.asdict(tiles), "error": f"{exc}"[:300]})
        best = min(times, key=times.get)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="8b")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--short_tokens", type=int, default=8, help="second, shorter run that cancels the prefill")
    p.add_argument("--moe_impls", nargs="*", default=["gather", "grouped", "dense"],
                   help="MoE implementations of the uncompiled fast path")
    p.add_argument("--compile", action="store_true", help="also the torch.compile(reduce-overhead) fast path")
    p.add_argument("--compile_impls", nargs="*", default=["auto"],
                   help="MoE implementations compiled with --compile; impl:B runs that one up to batch size B only; "
                        "impl+nodense: o_proj/down_proj through cuBLAS (FastDecoder dense_gemv=False); "
                        "impl+norope: without the RoPE/cache-write kernel (rope_kernel=False); impl+baseline: the "
                        "FastDecoder of --baseline_decoder")
    p.add_argument("--continuous", action="store_true",
                   help="also continuous.SlotDecoder decode steps with every slot busy, at the largest batch size "
                        "(compiled with --compile)")
    p.add_argument("--skip_eager", action="store_true", help="leave out the eager model.generate rows")
    p.add_argument("--ttft_prompt_len", type=int, default=2048, help="0: skip the time-to-first-token rows")
    p.add_argument("--profile", action="store_true",
                   help="profile --new_tokens steps of every fast decoder at batch 1: kernel time per step and the "
                        "top kernels (profile_<path>.txt in --out)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gemv_tiles", type=json.loads, default=None,
                   help="JSON of decode_kernels.GemvTiles fields for the gemv expert kernels (e.g. the best_tiles "
                        "that --check_kernels_only writes)")
    p.add_argument("--check_kernels_only", action="store_true",
                   help="only the decode-kernel check and device times (kernel_check.json); exit 1 on a mismatch")
    p.add_argument("--baseline_decoder", default=None,
                   help="a file holding another FastDecoder (e.g. an earlier commit's openmoe/fast_decode.py, "
                        "`git show REV:openmoe/fast_decode.py > FILE`) for the IMPL+baseline rows of "
                        "--compile_impls: in this process on the same weights (an A/B without run-to-run noise)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    a = p.parse_args(argv)
    if a.short_tokens >= a.new_tokens:
        raise SystemExit(f"error: --short_tokens ({a.short_tokens}) must be < --new_tokens ({a.new_tokens})")
    os.makedirs(a.out, exist_ok=True)  # every mode writes its JSON (and profiles) there
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if a.check_kernels_only:
        return 0 if check_kernels(preset(a.model), device, dtype, a.out) else 1
    if device.type == "cuda" and dtype == torch.bfloat16:  # the decode RoPE kernel, checked on every GPU run
        rope = check_rope(preset(a.model), device, dtype)
        print(json.dumps(rope), flush=True)
        if max(rope["q_rel_err"], rope["k_rel_err"], rope["v_rel_err"]) > 1e-2:
            raise SystemExit(f"error: the RoPE kernel disagrees with its reference: {rope}")
    model = build_model(a.model, device, dtype)
    cfg, counts = model.config, param_counts(model)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    bw = copy_bandwidth(device)
    rows, max_b = [], max(a.batch_sizes)
    head = {"model": a.model, "device": gpu, "dtype": str(dtype), "torch": torch.__version__, "params": counts,
            "copy_bandwidth_TBps": bw and bw / 1e12, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens}
    print(json.dumps(head), flush=True)
    dump = lambda: json.dump({**head, "rows": rows}, open(os.path.join(a.out, "infer_fast_bench.json"), "w"),  # noqa: E731
                             indent=2)
    context = a.prompt_len + a.new_tokens / 2
    # transformers' generate itself: model.generate routes to the fast decoder on CUDA unless told not to
    hf = {"fast_decode": False} if "fast_decode" in inspect.signature(model.generate).parameters else {}
    tiles = None if a.gemv_tiles is None else GemvTiles(**a.gemv_tiles)
    head["gemv_tiles"] = tiles and dataclasses.asdict(tiles)
    fast = {impl: FastDecoder(model, max_b, a.prompt_len + a.new_tokens, moe_impl=impl, gemv_tiles=tiles)
            for impl in a.moe_impls}
    max_batch = {}  # path -> largest batch size it runs at ("impl:B" in --compile_impls)
    if a.compile:
        for spec in a.compile_impls:
            name, _, limit = spec.partition(":")
            fast[f"{name}+compile"] = compiled_decoder(spec, model, max_b, a, tiles)
            max_batch[f"fast {name}+compile"] = int(limit) if limit else max_b
    for b in a.batch_sizes:
        ids = torch.randint(3, min(32000, cfg.vocab_size), (b, a.prompt_len), device=device)
        ids[:, 0] = 0  # <pad>-BOS
        bound_bytes = decode_step_bytes(cfg, counts, b, context)
        bound = b * H200_HBM_BYTES_PER_S / bound_bytes
        bound_all = b * H200_HBM_BYTES_PER_S / decode_step_bytes(cfg, counts, b, context, all_experts=True)
        runs = [] if a.skip_eager else [("hf generate", lambda x, n: model.generate(x, max_new_tokens=n,
                                                                                         eos_token_id=-1, **hf))]
        runs += [(f"fast {name}", (lambda d: lambda x, n: d.generate(x, max_new_tokens=n, eos_token_id=-1))(d))
                 for name, d in fast.items() if b <= max_batch.get(f"fast {name}", b)]
        outputs, speeds = {}, {}  # per path: greedy ids, decode tokens/s
        for name, gen in runs:
            t0 = time.perf_counter()
            try:
                t_long, per_step, out = measure(gen, ids, a.new_tokens, a.short_tokens, device, a.warmup)
            except Exception as e:  # record and go on: the other rows still count
                rows.append({"batch": b, "path": name, "error": f"{type(e).__name__}: {e}"[:500]})
                print(f"batch {b:3d} {name:24s} ERROR {rows[-1]['error']}", flush=True)
                dump()
                continue
            # greedy tokens equal to the first fast row's (bf16 rounding may flip near-ties; eager routes with
            # capacity, so it may drop tokens the dropless fast path keeps)
            first_fast = next((o for n, o in outputs.items() if n.startswith("fast")), None)
            same = None if first_fast is None else (out == first_fast).float().mean().item()
            same_eager = None if "hf generate" not in outputs or name == "hf generate" else (
                (out == outputs["hf generate"]).float().mean().item())
            outputs[name], speeds[name] = out, b / per_step
            row = {"batch": b, "path": name, "tokens_per_s": b * a.new_tokens / t_long,
                   "decode_ms_per_step": 1000 * per_step, "decode_tokens_per_s": b / per_step,
                   "bound_tokens_per_s": bound, "bound_all_experts_tokens_per_s": bound_all,
                   "bound_GB_per_step": bound_bytes / 1e9, "of_bound": b / per_step / bound,
                   "token_agreement_with_first_fast_row": same, "token_agreement_with_eager": same_eager,
                   "x_hf_generate": None if "hf generate" not in speeds else b / per_step / speeds["hf generate"],
                   "setup_and_measure_s": time.perf_counter() - t0}
            rows.append(row)
            print(f"batch {b:3d} {name:24s} {row['tokens_per_s']:9.1f} tok/s  decode {row['decode_ms_per_step']:7.2f}"
                  f" ms/step = {row['decode_tokens_per_s']:9.1f} tok/s = {100 * row['of_bound']:5.1f}% of bound "
                  f"{bound:8.1f} (all experts {bound_all:8.1f})  x hf {row['x_hf_generate']}  agree fast {same} "
                  f"hf {same_eager}", flush=True)
            dump()
        if a.continuous and b == max_b:  # a serving measure: the full batch of slots
            rows.append(continuous_row(model, ids, a, bound, device))
            print(f"batch {b:3d} {rows[-1]['path']:24s} decode {rows[-1].get('decode_ms_per_step', 0):7.2f} ms/step "
                  f"= {100 * rows[-1].get('of_bound', 0):5.1f}% of bound {rows[-1].get('error', '')}", flush=True)
            dump()
    if a.profile:
        ids = torch.randint(3, min(32000, cfg.vocab_size), (1, a.prompt_len), device=device)
        for name, dec in fast.items():
            rows.append(profile_row(name, dec, ids, a, device))
            print(f"profile batch 1 {name}: {rows[-1]}", flush=True)
            dump()
    if a.ttft_prompt_len:
        ids = torch.randint(3, min(32000, cfg.vocab_size), (1, a.ttft_prompt_len), device=device)
        ids[:, 0] = 0
        dec = FastDecoder(model, 1, a.ttft_prompt_len + 1)
        for name, gen in (("hf generate", lambda: model.generate(ids, max_new_tokens=1, eos_token_id=-1, **hf)),
                          ("fast (SDPA prefill)", lambda: dec.generate(ids, max_new_tokens=1, eos_token_id=-1))):
            gen()
            t = sorted(wall(gen, device) for _ in range(3))[1]  # the median of 3 calls after a warm-up
            rows.append({"batch": 1, "path": name, "ttft_prompt_len": a.ttft_prompt_len, "ttft_ms": 1000 * t})
            print(f"TTFT {a.ttft_prompt_len}-token prompt, {name}: {1000 * t:.1f} ms", flush=True)
        dump()
    return 0


if __name__ == "__main__":
    sys.exit(main())
