"""benchmark/fp8_recipe.py (the FP8 lever measured for issue 19) against an independent reference on the CPU: each
operand quantized by hand (row maxima -> e4m3 -> back to fp32), then an fp32 matmul. The fp8 GEMMs must equal that
reference to rounding of the output; the weight gradient of the grouped form, kept in high precision, must equal
torch._grouped_mm's own backward."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from benchmark import fp8_recipe as fp8
from tests.helpers import ROOT

pytestmark = pytest.mark.skipif(not hasattr(torch, "_scaled_mm"), reason="torch without _scaled_mm")


def dequant(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x rounded through e4m3 with one scale per slice along dim: max |x| -> 448 (written out, not fp8.quantize)."""
    scale = x.abs().amax(dim=dim, keepdim=True).clamp(min=1e-12) / 448.0
    return (x / scale).to(torch.float8_e4m3fn).float() * scale


def close(got, ref, tol=1e-5):
    assert ((got - ref).norm() / ref.norm()).item() < tol


def test_linear_forward_and_both_gradients_equal_the_dequantized_reference():
    torch.manual_seed(0)
    x = torch.randn(24, 32) * torch.logspace(-2, 2, 24)[:, None]  # rows of very different scales
    w = torch.randn(48, 32)
    g = torch.randn(24, 48)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8.fp8_linear(xr.view(2, 12, 32), wr)  # a leading batch dimension, as in the model
    y.backward(g.view(2, 12, 48))
    close(y.reshape(24, 48), dequant(x, -1) @ dequant(w, -1).t())
    close(xr.grad, dequant(g, -1) @ dequant(w, 0))  # contraction over N: w's columns
    close(wr.grad, dequant(g, 0).t() @ dequant(x, 0))  # contraction over tokens: columns of g and x
    exact = x @ w.t()  # what fp8 costs: a few percent, not a broken GEMM
    assert 0.005 < ((y.reshape(24, 48) - exact).norm() / exact.norm()).item() < 0.08


def test_grouped_forward_input_gradient_and_weight_gradient():
    torch.manual_seed(1)
    x, w, g = torch.randn(30, 32), torch.randn(3, 32, 16), torch.randn(30, 16)
    offs = torch.tensor([7, 7, 26], dtype=torch.int32)  # an empty group; rows 26..29 past the last offset
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8.fp8_grouped_mm(xr, wr, offs)
    y.backward(g)
    ref, ref_gx, start = torch.zeros(30, 16), torch.zeros(30, 32), 0
    for e, end in enumerate(offs.tolist()):
        ref[start:end] = dequant(x[start:end], -1) @ dequant(w[e], 0)
        ref_gx[start:end] = dequant(g[start:end], -1) @ dequant(w[e], 1).t()
        start = end
    close(y, ref)
    close(xr.grad, ref_gx)
    assert y[26:].abs().max() == 0 and xr.grad[26:].abs().max() == 0
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch._grouped_mm(xb, wb, offs=offs).backward(g)
    close(wr.grad, wb.grad, 1e-6)


def test_all_zero_rows_quantize_to_zeros():
    q, scale = fp8.quantize(torch.zeros(3, 16), -1)
    assert torch.isfinite(scale).all() and q.float().abs().max() == 0


def test_triton_quantizers_in_the_interpreter():
    """The Triton quantizers on the CPU (TRITON_INTERPRET=1, a subprocess): scales bit-equal to torch's `quantize`,
    every row/column and the transposed layout right. The values are compared after the same fp32 -> e4m3 cast as
    the kernels' (a one-line Triton kernel): the interpreter's own cast rounds some values near a power of two to
    half of the right one (124.8 -> 64 instead of 128), which on the GPU it does not (there the kernels equal torch's
    quantize exactly: benchmark/fp8_check.py)."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch, triton, triton.language as tl
        from benchmark import fp8_recipe as f

        @triton.jit
        def cast(x_ptr, q_ptr, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(q_ptr + offs, tl.load(x_ptr + offs, mask=offs < n).to(tl.float8e4nv), mask=offs < n)

        def same_cast(x, dim):  # torch's quantize, its last step through the interpreter's cast
            q, scale = f.quantize(x, dim)
            v = (x.float() / scale).clamp(-448, 448).contiguous()
            out = torch.empty(v.shape, dtype=torch.float8_e4m3fn)
            cast[(triton.cdiv(v.numel(), 1024),)](v, out, v.numel(), BLOCK=1024)
            return out, scale

        torch.manual_seed(0)
        for shape in [(5, 300), (70, 130), (3, 300, 200)]:  # ragged tiles; a batch of matrices; > one row chunk
            x = (torch.randn(*shape) * torch.logspace(-3, 3, shape[-1])).to(torch.bfloat16)
            x[..., 1, :] = 0  # an all-zero row
            got, want = [f._cols_t_triton(x)], [same_cast(x.transpose(-2, -1), -1)]
            if x.dim() == 2:
                got.append(f._rows_triton(x)); want.append(same_cast(x, -1))
            for (q, s), (qr, sr) in zip(got, want):
                assert q.shape == qr.shape and q.is_contiguous() and s.shape == sr.shape, (q.shape, qr.shape)
                assert torch.equal(s, sr) and torch.equal(q.float(), qr.float()), shape
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-2000:] + res.stderr[-3000:]
