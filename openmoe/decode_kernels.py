"""Expert GEMV for decoding a few tokens: each (token, choice) pair reads only its chosen expert's weights, indexed
by expert id inside the kernel, with no gathered copy ([T, K, H, I] in `gathered_experts`) and no grouped-GEMM
tiles sized for large M, nor its sort (at one token on the H200, OpenMoE-8B shapes: 119 us per MoE layer against
214 us for moe.grouped_experts and 469 us for the gathered copies).
Shapes: T tokens, K top-k, P = T * K (token, choice) pairs, H hidden, I expert width, E experts,
G = gate_multiple * I gate width, S split of a reduction.

    y = expert_gemv(experts, x, r)   # x [T, H], r a RouterOutput -> [T, H]; torch reference off CUDA / without Triton

Triton kernels (GPU only; Triton is not installed on the CPU test hosts), one launch each per MoE layer and weight:
  _gate_up_kernel  (gate_split 1) h[p, n] = act(x[t_p] @ wi_gate[e_p])[n] * (x[t_p] @ wi_up[e_p])[n] for a block of
                   n: the gate's two halves (OpenMoE's double gate: x1 * silu(x2)) and the up column are read in the
                   same pass and the activation is applied in fp32 before the one bf16 store; grid (I / BLOCK_N, P).
  _gemv_kernel     partial[s, p, :] = in[p, K_s] @ w[e_p][K_s, :] over the s-th slice of the K reduction (split-K:
                   a grid of N / BLOCK_N * P programs alone would leave most SMs idle at H = 2048 outputs); grid
                   (N / BLOCK_N, S, P), fp32 partials, no atomics (deterministic). The down projection always; with
                   gate_split > 1 also wi_gate and wi_up (activation then in the torch epilogue): more, shorter
                   programs, which measured faster on the H200 (benchmark/RESULTS.md, "Single-GPU decode speed").
  _linear_gemv_kernel  x @ w.T for an nn.Linear weight w [N, K] (rows contiguous along K), split-K with fp32
                   partials: the dense o_proj / down_proj GEMVs at batch 1, where cuBLAS runs split-K plus a reduce
                   kernel (`linear_gemv`, FastDecoder(dense_gemv=True)).
  _rope_qkv_kernel one decode token's fused q/k/v row: RoPE on q and k, k and v stored into the static cache at
                   the step's column, q written out for attention (`rope_qkv_into_cache`).
The split-K sums, the combine weights (sum over k of w[t, k] * y[t, k]) and the split gate/up epilogue are a few
small torch ops that torch.compile fuses. Accumulation is fp32; the reference (`gathered_experts`) rounds each
matmul to bf16, so on GPU the two agree within bf16 rounding, not bitwise (the GPU kernel check has the tolerance).
The kernels are plain `kernel[grid](...)` launches, which torch.compile traces into its graph (user-defined Triton
kernels), so they are captured in the decode step's CUDA graph like the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from openmoe.moe import StackedExperts, swiglu
from openmoe.router import RouterOutput

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU hosts: the reference path below
    HAS_TRITON = False


@dataclass(frozen=True)
class GemvTiles:
    """Tile sizes of the kernels, fixed per decoder (no autotuning: it would run inside torch.compile's capture).
    gate_*: the gate/up pass (gate_split 1: the fused single-pass kernel; > 1: split-K _gemv_kernel per weight);
    down_*: the down projection. The defaults are the fastest of two sweeps on the H200 at OpenMoE-8B's shapes,
    batch 1 (`benchmark/infer_fast_bench.py --check_kernels_only` reruns it): 119 us per MoE layer against 236 us
    for the first guess (64 x 64 tiles, fused gate/up) and 214 us for the grouped GEMM path."""

    gate_block_n: int = 64
    gate_block_k: int = 128
    gate_warps: int = 4
    gate_split: int = 4
    down_block_n: int = 32
    down_block_k: int = 128
    down_split: int = 8
    down_warps: int = 4
    dense_block_n: int = 32  # linear_gemv (o_proj, down_proj at batch 1, FastDecoder's dense_gemv): the fastest
    dense_block_k: int = 512  # of 10 tilings at OpenMoE-8B's shapes on the H200 (RESULTS.md)
    dense_split: int = 4
    dense_warps: int = 8


def gathered_experts(experts: StackedExperts, x: torch.Tensor, r: RouterOutput) -> torch.Tensor:
    """Reference: x [T, H] -> [T, H], each token through its K chosen experts, weights gathered per token."""
    wg, wu, wo = experts.wi_gate[r.expert_idx], experts.wi_up[r.expert_idx], experts.wo[r.expert_idx]  # [T, K, ., .]
    h = experts.act(torch.einsum("th,tkhg->tkg", x, wg)) * torch.einsum("th,tkhi->tki", x, wu)  # [T, K, I]
    y = torch.einsum("tki,tkio->tko", h, wo)  # [T, K, H]
    return (y * r.combine_weight[..., None].to(y.dtype)).sum(dim=1)


def triton_supported(experts: StackedExperts, x: torch.Tensor) -> bool:
    """The kernels cover the two expert families (double-gated swiglu, llama silu) on CUDA in half precision."""
    act = experts.act
    return (HAS_TRITON and x.is_cuda and (x.dtype == torch.bfloat16 or x.dtype == torch.float16)
            and (act is swiglu or act is F.silu) and experts.wi_gate.dtype == x.dtype)


def expert_gemv(experts: StackedExperts, x: torch.Tensor, r: RouterOutput,
                tiles: GemvTiles | None = None) -> torch.Tensor:
    """x [T, H] -> [T, H]: the Triton kernels where supported, else the gathered-weights reference."""
    if not triton_supported(experts, x):
        return gathered_experts(experts, x, r)
    return triton_expert_gemv(experts, x, r, tiles)


def triton_expert_gemv(experts: StackedExperts, x: torch.Tensor, r: RouterOutput,
                       tiles: GemvTiles | None = None) -> torch.Tensor:
    """The two kernels on any device Triton runs on (CUDA; the CPU through TRITON_INTERPRET=1 in the tests)."""
    c = GemvTiles() if tiles is None else tiles
    t, k = r.expert_idx.shape
    hidden, width = experts.wo.shape[2], experts.wo.shape[1]  # H, I
    pairs = t * k
    x = x.contiguous()
    idx = r.expert_idx.reshape(-1).contiguous()  # [P]: pair p = t * K + k
    wg, wu, wo = experts.wi_gate, experts.wi_up, experts.wo
    if c.gate_split > 1:
        xp = x.repeat_interleave(k, dim=0)  # [P, H]: pair p's input row
        gate = _gemv(xp, idx, wg, c.gate_block_n, c.gate_block_k, c.gate_split, c.gate_warps)  # [P, G] fp32
        up = _gemv(xp, idx, wu, c.gate_block_n, c.gate_block_k, c.gate_split, c.gate_warps)  # [P, I] fp32
        h = (experts.act(gate) * up).to(x.dtype)  # [P, I]
    else:
        h = torch.empty(pairs, width, dtype=x.dtype, device=x.device)  # [P, I]
        _gate_up_kernel[(triton.cdiv(width, c.gate_block_n), pairs)](
            x, idx, wg, wu, h, hidden, width, k,
            x.stride(0), wg.stride(0), wg.stride(1), wu.stride(0), wu.stride(1), h.stride(0),
            DOUBLE_GATE=experts.act is swiglu, BLOCK_N=c.gate_block_n, BLOCK_K=c.gate_block_k,
            num_warps=c.gate_warps)
    y = _gemv(h, idx, wo, c.down_block_n, c.down_block_k, c.down_split, c.down_warps).view(t, k, hidden)  # fp32
    return (y * r.combine_weight[..., None].float()).sum(dim=1).to(x.dtype)


def _gemv(rows: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, block_n: int, block_k: int, split: int,
          warps: int) -> torch.Tensor:
    """rows [P, K] (pair p's input), idx [P] expert ids, w [E, K, N] -> rows[p] @ w[idx[p]], [P, N] fp32."""
    pairs, kdim = rows.shape
    n = w.shape[2]
    split = split if kdim >= split * block_k else 1
    chunk = triton.cdiv(triton.cdiv(kdim, split), block_k) * block_k  # K rows per split, whole blocks
    partial = torch.empty(split, pairs, n, dtype=torch.float32, device=rows.device)  # [S, P, N]
    _gemv_kernel[(triton.cdiv(n, block_n), split, pairs)](
        rows, idx, w, partial, n, kdim, chunk,
        rows.stride(0), w.stride(0), w.stride(1), partial.stride(0), partial.stride(1),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return partial.sum(0)


def linear_gemv(x: torch.Tensor, weight: torch.Tensor, tiles: GemvTiles | None = None) -> torch.Tensor:
    """x [T, K] -> x @ weight.T [T, N] in x's dtype, weight [N, K] (nn.Linear's layout): the Triton split-K GEMV,
    one launch (cuBLAS runs a split-K GEMV and a reduce kernel at OpenMoE-8B's o_proj and down_proj shapes); the fp32
    partials are summed in torch, which torch.compile fuses into what follows. Each of the T rows reads the weight:
    meant for one decode row. Accumulation is fp32 with one rounding, as cuBLAS's, in another order."""
    c = GemvTiles() if tiles is None else tiles
    t, kdim = x.shape
    n = weight.shape[0]
    split = c.dense_split if kdim >= c.dense_split * c.dense_block_k else 1
    chunk = triton.cdiv(triton.cdiv(kdim, split), c.dense_block_k) * c.dense_block_k  # K per split, whole blocks
    x = x.contiguous()
    partial = torch.empty(split, t, n, dtype=torch.float32, device=x.device)  # [S, T, N]
    _linear_gemv_kernel[(triton.cdiv(n, c.dense_block_n), split, t)](
        x, weight, partial, n, kdim, chunk, x.stride(0), weight.stride(0), partial.stride(0), partial.stride(1),
        BLOCK_N=c.dense_block_n, BLOCK_K=c.dense_block_k, num_warps=c.dense_warps)
    return partial.sum(0).to(x.dtype)


def rope_qkv_into_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, col: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """One decode token per row: qkv [B, (N + 2 N_kv) * D] (q, k, v heads of the fused projection), cos/sin [B, 1, D]
    or [B, D] -> q [B, N, 1, D] with RoPE; k with RoPE and v written into rows [:B] of k_cache/v_cache
    [B_max, N_kv, M, D] at column col [1]. One Triton launch (program per row and head) where the compiled torch
    version runs several kernels (the q and k rotations, the two cache writes and a copy of q for attention).
    fp32 arithmetic, one rounding."""
    b = qkv.shape[0]
    assert cos.stride(-1) == 1 and sin.stride() == cos.stride() and k_cache.stride(-1) == 1 == v_cache.stride(-1)
    d = k_cache.shape[-1]
    q = torch.empty(b, num_heads, 1, d, dtype=qkv.dtype, device=qkv.device)
    _rope_qkv_kernel[(b, num_heads + 2 * num_kv_heads)](
        qkv, cos, sin, q, k_cache, v_cache, col, qkv.stride(0), cos.stride(0), q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=d // 2)
    return q


if HAS_TRITON:

    @triton.jit
    def _rope_qkv_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, col_ptr, stride_xb, stride_cb,
                         stride_qb, stride_qh, stride_kb, stride_kh, stride_km, stride_vb, stride_vh, stride_vm,
                         NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr):
        """Head h of row b: h < N a query (rotated, to q), then N_kv keys (rotated, to the cache), then N_kv values
        (to the cache). Rotate-half RoPE: out1 = x1 cos1 - x2 sin1, out2 = x2 cos2 + x1 sin2 over the two halves."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs = tl.arange(0, HALF)
        base = qkv_ptr + b * stride_xb + h * 2 * HALF
        x1 = tl.load(base + offs).to(tl.float32)
        x2 = tl.load(base + HALF + offs).to(tl.float32)
        col = tl.load(col_ptr)
        if h < NUM_HEADS + NUM_KV_HEADS:
            c1 = tl.load(cos_ptr + b * stride_cb + offs).to(tl.float32)
            c2 = tl.load(cos_ptr + b * stride_cb + HALF + offs).to(tl.float32)
            s1 = tl.load(sin_ptr + b * stride_cb + offs).to(tl.float32)
            s2 = tl.load(sin_ptr + b * stride_cb + HALF + offs).to(tl.float32)
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
            if h < NUM_HEADS:
                dst = q_ptr + b * stride_qb + h * stride_qh
            else:
                dst = k_ptr + b * stride_kb + (h - NUM_HEADS) * stride_kh + col * stride_km
            tl.store(dst + offs, y1.to(q_ptr.dtype.element_ty))
            tl.store(dst + HALF + offs, y2.to(q_ptr.dtype.element_ty))
        else:
            dst = v_ptr + b * stride_vb + (h - NUM_HEADS - NUM_KV_HEADS) * stride_vh + col * stride_vm
            tl.store(dst + offs, x1.to(v_ptr.dtype.element_ty))
            tl.store(dst + HALF + offs, x2.to(v_ptr.dtype.element_ty))

    @triton.jit
    def _linear_gemv_kernel(x_ptr, w_ptr, out_ptr, N, K, CHUNK, stride_xt, stride_wn, stride_os, stride_ot,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """partial[s, t, n] = x[t, K_s] . w[n, K_s] for a block of rows n over the s-th slice of K: rows of w are
        contiguous along K, so each [BLOCK_N, BLOCK_K] tile is BLOCK_N coalesced runs; products accumulate in a
        [BLOCK_N, BLOCK_K] fp32 tile and are reduced once at the end."""
        pid_n = tl.program_id(0)
        s = tl.program_id(1)
        t = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        start = s * CHUNK
        for k0 in range(0, CHUNK, BLOCK_K):
            offs_k = start + k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            xk = tl.load(x_ptr + t * stride_xt + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            acc += w.to(tl.float32) * xk[None, :]
        tl.store(out_ptr + s * stride_os + t * stride_ot + offs_n, tl.sum(acc, axis=1), mask=mask_n)


    @triton.jit
    def _gate_up_kernel(x_ptr, idx_ptr, wg_ptr, wu_ptr, h_ptr, H, I, K_TOP,
                        stride_xt, stride_ge, stride_gh, stride_ue, stride_uh, stride_hp,
                        DOUBLE_GATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        p = tl.program_id(1)
        t = p // K_TOP
        e = tl.load(idx_ptr + p).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] columns of h (and of each gate half)
        mask_n = offs_n < I
        acc_1 = tl.zeros([BLOCK_N], dtype=tl.float32)  # first gate half (the whole gate when single)
        acc_2 = tl.zeros([BLOCK_N], dtype=tl.float32)  # second gate half: the silu argument of x1 * silu(x2)
        acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
        g_base = wg_ptr + e * stride_ge
        u_base = wu_ptr + e * stride_ue
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < H
            xk = tl.load(x_ptr + t * stride_xt + offs_k, mask=mask_k, other=0.0).to(tl.float32)[:, None]
            m = mask_k[:, None] & mask_n[None, :]
            g_ptrs = g_base + offs_k[:, None] * stride_gh + offs_n[None, :]  # [BLOCK_K, BLOCK_N]
            acc_1 += tl.sum(xk * tl.load(g_ptrs, mask=m, other=0.0).to(tl.float32), axis=0)
            if DOUBLE_GATE:
                acc_2 += tl.sum(xk * tl.load(g_ptrs + I, mask=m, other=0.0).to(tl.float32), axis=0)
            u_ptrs = u_base + offs_k[:, None] * stride_uh + offs_n[None, :]
            acc_u += tl.sum(xk * tl.load(u_ptrs, mask=m, other=0.0).to(tl.float32), axis=0)
        if DOUBLE_GATE:
            act = acc_1 * (acc_2 * tl.sigmoid(acc_2))  # swiglu: x1 * silu(x2)
        else:
            act = acc_1 * tl.sigmoid(acc_1)  # silu
        tl.store(h_ptr + p * stride_hp + offs_n, (act * acc_u).to(h_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _gemv_kernel(in_ptr, idx_ptr, w_ptr, out_ptr, N, K, CHUNK,
                     stride_ip, stride_we, stride_wk, stride_os, stride_op,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        s = tl.program_id(1)
        p = tl.program_id(2)
        e = tl.load(idx_ptr + p).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output columns
        mask_n = offs_n < N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        w_base = w_ptr + e * stride_we
        start = s * CHUNK
        for k0 in range(0, CHUNK, BLOCK_K):
            offs_k = start + k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            xk = tl.load(in_ptr + p * stride_ip + offs_k, mask=mask_k, other=0.0).to(tl.float32)[:, None]
            w = tl.load(w_base + offs_k[:, None] * stride_wk + offs_n[None, :], mask=mask_k[:, None] & mask_n[None, :],
                        other=0.0)
            acc += tl.sum(xk * w.to(tl.float32), axis=0)
        tl.store(out_ptr + s * stride_os + p * stride_op + offs_n, acc, mask=mask_n)
