"""FP8 training matmuls, measured as a lever for issue 19 and not adopted (benchmark/fp8_check.py; RESULTS.md, "FP8
GEMMs at OpenMoE-8B shapes"): e4m3 operands, one dynamic scale per row of each operand along the
contraction dimension, fp32 accumulation, outputs in the input's dtype. The recipe is torchao's "rowwise" float8
training written out (torchao is not a dependency, and its grouped form needs padded groups): every operand is
scaled by its own row maxima in every GEMM, so an outlier only costs precision in its own row.

Shapes: M rows (tokens), K contraction, N outputs, G groups (local experts).

  fp8_linear(x [..., K], w [N, K])  x @ w.T: forward, input gradient and weight gradient in fp8 (torch._scaled_mm)
  fp8_grouped_mm(x [M, K], w [G, K, N], offs [G])  rows offs[g-1]:offs[g] of x times w[g]: forward and input
      gradient in fp8 (torch._scaled_grouped_mm on CUDA, a loop of torch._scaled_mm elsewhere), weight gradient in
      the input dtype (torch._grouped_mm): the per-expert weight gradient sums over a variable number of tokens,
      the GEMM where fp8 loses most and saves least (torchao's "rowwise_with_gw_hp" choice)

Meant for the dense linears and the experts; the LM head, router and attention's softmax(q k^T) v would stay in
bf16 (torchtitan's default, DeepSeek-V3). Reference: quantize each operand as below, dequantize, matmul in fp32
(tests/unit/test_bench_fp8.py on the CPU; fp8_check.py on the GPU).
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
_TINY = 1e-12  # floor of a row's maximum: an all-zero row gets a finite scale (and quantizes to zeros)


def quantize(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (q in e4m3, scale in fp32) with x ~= q * scale; one scale per slice along `dim` (its max |x| maps to
    448), kept as a size-1 dimension. q is contiguous in x's dimension order. The reference of the kernels below."""
    amax = x.abs().amax(dim=dim, keepdim=True).float().clamp(min=_TINY)
    scale = amax * (1.0 / E4M3_MAX)  # a multiply, as the kernels do (torch's CUDA division by a scalar is one too)
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q.contiguous(), scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous x [R, C] -> (q [R, C], scale [R, 1]): `quantize(x, -1)`, one Triton pass per row on CUDA."""
    if x.is_cuda and HAS_TRITON:
        return _rows_triton(x)
    return quantize(x, -1)


def quantize_cols_t(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous x [..., R, C] -> (q [..., C, R] contiguous, scale [..., C, 1]): x's columns quantized and written
    transposed, i.e. `quantize(x.transpose(-2, -1), -1)`; two Triton passes on CUDA (column maxima, then cast and
    transpose in tiles)."""
    if x.is_cuda and HAS_TRITON:
        return _cols_t_triton(x)
    return quantize(x.transpose(-2, -1), -1)


def _rows_triton(x):
    r, c = x.shape
    q = torch.empty(r, c, dtype=E4M3, device=x.device)
    scale = torch.empty(r, 1, dtype=torch.float32, device=x.device)
    _rows_kernel[(r,)](x, q, scale, c, BLOCK=min(4096, triton.next_power_of_2(c)), num_warps=8)
    return q, scale


def _cols_t_triton(x):
    *lead, r, c = x.shape
    b = x.numel() // (r * c)
    q = torch.empty(*lead, c, r, dtype=E4M3, device=x.device)
    amax = torch.zeros(*lead, c, dtype=torch.float32, device=x.device)
    scale = torch.empty(*lead, c, 1, dtype=torch.float32, device=x.device)
    _col_max_kernel[(b, triton.cdiv(c, 128), triton.cdiv(r, 256))](x, amax, r, c, BR=32, BC=128, CHUNK=256,
                                                                   num_warps=4)
    _cast_t_kernel[(b, triton.cdiv(r, 64), triton.cdiv(c, 64))](x, q, amax, scale, r, c, BR=64, BC=64, num_warps=4)
    return q, scale


try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU hosts: torch's quantize
    HAS_TRITON = False

if HAS_TRITON:

    @triton.jit
    def _rows_kernel(x_ptr, q_ptr, s_ptr, c, BLOCK: tl.constexpr):
        base = tl.program_id(0).to(tl.int64) * c
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for c0 in range(0, c, BLOCK):
            offs = c0 + tl.arange(0, BLOCK)
            amax = tl.maximum(amax, tl.abs(tl.load(x_ptr + base + offs, mask=offs < c, other=0.0).to(tl.float32)))
        scale = tl.maximum(tl.max(amax, 0), 1e-12) * (1.0 / 448.0)
        tl.store(s_ptr + tl.program_id(0), scale)
        for c0 in range(0, c, BLOCK):  # the row again, from L2
            offs = c0 + tl.arange(0, BLOCK)
            v = tl.math.div_rn(tl.load(x_ptr + base + offs, mask=offs < c, other=0.0).to(tl.float32), scale)
            v = tl.minimum(tl.maximum(v, -448.0), 448.0)
            tl.store(q_ptr + base + offs, v.to(tl.float8e4nv), mask=offs < c)

    @triton.jit
    def _col_max_kernel(x_ptr, amax_ptr, r, c, BR: tl.constexpr, BC: tl.constexpr, CHUNK: tl.constexpr):
        """amax[b, col] = max |x[b, :, col]| over this program's CHUNK rows (atomic max into a zeroed buffer)."""
        b = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        amax = tl.zeros([BR, BC], dtype=tl.float32)
        for r0 in range(tl.program_id(2) * CHUNK, tl.program_id(2) * CHUNK + CHUNK, BR):
            rows = r0 + tl.arange(0, BR)
            mask = (rows[:, None] < r) & (cols[None, :] < c)
            v = tl.load(x_ptr + b * r * c + rows[:, None] * c + cols[None, :], mask=mask, other=0.0)
            amax = tl.maximum(amax, tl.abs(v.to(tl.float32)))
        tl.atomic_max(amax_ptr + b * c + cols, tl.max(amax, 0), mask=cols < c)  # values >= 0: float max is exact

    @triton.jit
    def _cast_t_kernel(x_ptr, q_ptr, amax_ptr, s_ptr, r, c, BR: tl.constexpr, BC: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1) * BR + tl.arange(0, BR)
        cols = tl.program_id(2) * BC + tl.arange(0, BC)
        mask = (rows[:, None] < r) & (cols[None, :] < c)
        v = tl.load(x_ptr + b * r * c + rows[:, None] * c + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.load(amax_ptr + b * c + cols, mask=cols < c, other=1.0), 1e-12) * (1.0 / 448.0)
        if tl.program_id(1) == 0:  # one row of tiles writes the scales
            tl.store(s_ptr + b * c + cols, scale, mask=cols < c)
        v = tl.minimum(tl.maximum(tl.math.div_rn(v, scale[None, :]), -448.0), 448.0).to(tl.float8e4nv)
        tl.store(q_ptr + b * c * r + cols[None, :] * r + rows[:, None], v, mask=mask)


def _mm(qa, sa, qb, sb, out_dtype: torch.dtype) -> torch.Tensor:
    """qa [M, K] (scales sa [M, 1]) @ qb [N, K].T (scales sb [N, 1]) -> [M, N]. _scaled_mm takes its second operand
    K-major (a transposed row-major tensor) and row scales [M, 1] x [1, N]."""
    return torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb.t(), out_dtype=out_dtype)


class _Fp8Linear(torch.autograd.Function):
    """y = x @ w.T with all three GEMMs in fp8. Saves the unquantized x and w (as nn.Linear does): each backward GEMM
    quantizes along its own contraction dimension (the token dimension for the weight gradient)."""

    @staticmethod
    def forward(ctx, x, weight):  # x [M, K], weight [N, K]
        ctx.save_for_backward(x, weight)
        return _mm(*quantize_rows(x), *quantize_rows(weight), x.dtype)  # [M, N]

    @staticmethod
    def backward(ctx, grad):  # grad [M, N]
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # [M, N] @ [N, K]: w's columns quantized, written [K, N]
            grad_x = _mm(*quantize_rows(grad), *quantize_cols_t(weight), x.dtype)
        if ctx.needs_input_grad[1]:  # [N, M] @ [M, K]: both along the tokens
            grad_w = _mm(*quantize_cols_t(grad), *quantize_cols_t(x), weight.dtype)
        return grad_x, grad_w


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) (no bias) with fp8 GEMMs. x [..., K], weight [N, K] -> [..., N]."""
    y = _Fp8Linear.apply(x.reshape(-1, x.shape[-1]).contiguous(), weight)
    return y.view(*x.shape[:-1], weight.shape[0])


def _grouped(qa, sa, qb, sb, offs: torch.Tensor, out_dtype: torch.dtype, kernel: bool | None = None) -> torch.Tensor:
    """Rows offs[g-1]:offs[g] (from 0) of qa [M, K] (scales sa [M, 1]) times qb[g].T, qb [G, N, K] K-major (scales sb
    [G, N, 1]) -> [M, N]. Rows past offs[-1] are not computed (left unwritten by the kernel, zero in the loop).
    kernel: torch._scaled_grouped_mm (default on CUDA, the only device it runs on) or a loop of torch._scaled_mm."""
    if qa.is_cuda if kernel is None else kernel:
        return torch._scaled_grouped_mm(qa, qb.transpose(-2, -1), sa.squeeze(-1), sb.squeeze(-1), offs=offs,
                                        out_dtype=out_dtype)
    out = torch.zeros(qa.shape[0], qb.shape[1], dtype=out_dtype, device=qa.device)
    start = 0
    for g, end in enumerate(offs.tolist()):  # host loop: the reference form of the grouped kernel
        if end > start:
            out[start:end] = _mm(qa[start:end], sa[start:end], qb[g], sb[g], out_dtype)
        start = end
    return out


class _Fp8GroupedMm(torch.autograd.Function):
    """Grouped x @ w[g]: forward and input gradient in fp8, weight gradient in the input dtype (torch._grouped_mm)."""

    @staticmethod
    def forward(ctx, x, weight, offs):  # x [M, K], weight [G, K, N] contiguous, offs [G] int32
        ctx.save_for_backward(x, weight, offs)
        return _grouped(*quantize_rows(x), *quantize_cols_t(weight), offs, x.dtype)  # w -> [G, N, K]: [M, N]

    @staticmethod
    def backward(ctx, grad):  # grad [M, N]
        x, weight, offs = ctx.saved_tensors
        grad = grad.contiguous()
        g, k, n = weight.shape
        qw, sw = quantize_rows(weight.view(g * k, n))  # along N, already N-major: [G, K, N] is the K-output layout
        grad_x = _grouped(*quantize_rows(grad), qw.view(g, k, n), sw.view(g, k, 1), offs, x.dtype)  # [M, K]
        grad_w = torch._grouped_mm(x.t(), grad, offs=offs).to(weight.dtype)  # [K, M] @ [M, N] per group: [G, K, N]
        return grad_x, grad_w, None


def fp8_grouped_mm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm(x, weight, offs=offs) with the forward and input-gradient GEMMs in fp8."""
    return _Fp8GroupedMm.apply(x.contiguous(), weight.contiguous(), offs)
