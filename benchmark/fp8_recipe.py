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
    448), kept as a size-1 dimension. q is contiguous in x's dimension order."""
    amax = x.abs().amax(dim=dim, keepdim=True).float().clamp(min=_TINY)
    scale = amax / E4M3_MAX
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q.contiguous(), scale


def _mm(a: torch.Tensor, b_t: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] @ b_t [N, K].T -> [M, N], both quantized along K. _scaled_mm takes its second operand K-major
    (a transposed row-major tensor) and row scales [M, 1] x [1, N]."""
    qa, sa = quantize(a, -1)  # [M, K], [M, 1]
    qb, sb = quantize(b_t, -1)  # [N, K], [N, 1]
    return torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb.t(), out_dtype=out_dtype)


class _Fp8Linear(torch.autograd.Function):
    """y = x @ w.T with all three GEMMs in fp8. Saves the unquantized x and w (as nn.Linear does): each backward GEMM
    quantizes along its own contraction dimension (the token dimension for the weight gradient)."""

    @staticmethod
    def forward(ctx, x, weight):  # x [M, K], weight [N, K]
        ctx.save_for_backward(x, weight)
        return _mm(x, weight, x.dtype)  # [M, N]

    @staticmethod
    def backward(ctx, grad):  # grad [M, N]
        x, weight = ctx.saved_tensors
        grad_x = _mm(grad, weight.t(), x.dtype) if ctx.needs_input_grad[0] else None  # [M, N] @ [N, K]
        grad_w = _mm(grad.t(), x.t(), weight.dtype) if ctx.needs_input_grad[1] else None  # [N, M] @ [M, K]
        return grad_x, grad_w


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) (no bias) with fp8 GEMMs. x [..., K], weight [N, K] -> [..., N]."""
    y = _Fp8Linear.apply(x.reshape(-1, x.shape[-1]), weight)
    return y.view(*x.shape[:-1], weight.shape[0])


def _grouped(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype, quant=quantize,
             kernel: bool | None = None) -> torch.Tensor:
    """a [M, K] @ b [G, K, N] per row group (rows offs[g-1]:offs[g], from 0) -> [M, N], in fp8: a quantized along K
    per row, b along K per (group, column). Rows past offs[-1] are not computed (left unwritten by the kernel, zero
    in the loop). quant: `quantize` or its compiled form; kernel: torch._scaled_grouped_mm (default on CUDA, the only
    device it runs on) or the loop."""
    qa, sa = quant(a, -1)  # [M, K], [M, 1]
    qb, sb = quant(b.transpose(-2, -1), -1)  # [G, N, K] (K-major, the layout both kernels take), [G, N, 1]
    if a.is_cuda if kernel is None else kernel:
        return torch._scaled_grouped_mm(qa, qb.transpose(-2, -1), sa.squeeze(-1), sb.squeeze(-1), offs=offs,
                                        out_dtype=out_dtype)
    out = torch.zeros(a.shape[0], b.shape[-1], dtype=out_dtype, device=a.device)
    start = 0
    for g, end in enumerate(offs.tolist()):  # host loop: the reference form of the grouped kernel
        if end > start:
            out[start:end] = torch._scaled_mm(qa[start:end], qb[g].t(), scale_a=sa[start:end], scale_b=sb[g].t(),
                                              out_dtype=out_dtype)
        start = end
    return out


class _Fp8GroupedMm(torch.autograd.Function):
    """Grouped x @ w[g]: forward and input gradient in fp8, weight gradient in the input dtype (torch._grouped_mm)."""

    @staticmethod
    def forward(ctx, x, weight, offs, quant):  # x [M, K], weight [G, K, N], offs [G] int32
        ctx.save_for_backward(x, weight, offs)
        ctx.quant = quant
        return _grouped(x, weight, offs, x.dtype, quant)  # [M, N]

    @staticmethod
    def backward(ctx, grad):  # grad [M, N]
        x, weight, offs = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = _grouped(grad, weight.transpose(-2, -1), offs, x.dtype, ctx.quant)  # [M, N] @ [G, N, K]
        grad_w = torch._grouped_mm(x.t(), grad, offs=offs).to(weight.dtype)  # [K, M] @ [M, N] per group: [G, K, N]
        return grad_x, grad_w, None, None


def fp8_grouped_mm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, quant=quantize) -> torch.Tensor:
    """torch._grouped_mm(x, weight, offs=offs) with the forward and input-gradient GEMMs in fp8. quant: `quantize`
    or `compiled_quantize()` (the MoE layer runs eager, and eager quantization is ~5 memory passes per operand)."""
    return _Fp8GroupedMm.apply(x, weight, offs, quant)


def compiled_quantize(backend: str = "inductor"):
    """`quantize` through torch.compile: one reduction and one cast kernel per operand. The row count of a 2-D
    operand (tokens, which vary per dropless call) is dynamic; everything else is static."""
    compiled = torch.compile(quantize, backend=backend)

    def call(x: torch.Tensor, dim: int):
        if x.dim() == 2:
            torch._dynamo.maybe_mark_dynamic(x, 0)
        return compiled(x, dim)

    return call
