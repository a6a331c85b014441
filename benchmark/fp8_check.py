"""One-GPU check and micro-benchmark of benchmark/fp8_recipe.py at OpenMoE-8B shapes (hidden 2048, MLP and expert width
8192, 16 local experts of 32 at EP 2, 8,192 tokens per micro-batch, 2 choices each).

For each GEMM group: forward + backward time of bf16 (F.linear / torch._grouped_mm) against the fp8 path, eager and
with compiled quantization; the fp8 path's error against the dequantized reference (what the kernel must compute:
fp32 matmul of q * scale) and against the bf16 inputs' exact product (what fp8 costs). Also the grouped kernel
(torch._scaled_grouped_mm) against the dequantized reference, one fp32 matmul per group.

    python3 benchmark/fp8_check.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark import fp8_recipe as fp8  # noqa: E402


def cuda_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def dequant(x, dim):
    q, s = fp8.quantize(x, dim)
    return q.float() * s


def loop_mm(x, w, offs):
    """Rows offs[g-1]:offs[g] of x times w[g], one fp32 matmul per group (the grouped GEMMs' reference)."""
    out, start = torch.zeros(x.shape[0], w.shape[-1], device=x.device), 0
    for g, end in enumerate(offs.tolist()):
        out[start:end] = x[start:end] @ w[g]
        start = end
    return out


def linear_rows(m: int, shapes: dict) -> list[dict]:
    rows = []
    for name, (n, k) in shapes.items():
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = (torch.randn(n, k, device="cuda") * k ** -0.5).to(torch.bfloat16)
        g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8.fp8_linear(xr, wr)
        y.backward(g)
        exact = (x.float() @ w.float().t(), g.float() @ w.float(), g.float().t() @ x.float())
        deq = (dequant(x, -1) @ dequant(w, -1).t(), dequant(g, -1) @ dequant(w.t(), -1).t(),
               dequant(g.t(), -1) @ dequant(x.t(), -1).t())
        got = (y, xr.grad, wr.grad)

        def run_bf16():
            a, b = x.detach().requires_grad_(), w.detach().requires_grad_()
            torch.nn.functional.linear(a, b).backward(g)

        def run_fp8(f=fp8.fp8_linear):
            a, b = x.detach().requires_grad_(), w.detach().requires_grad_()
            f(a, b).backward(g)

        compiled = torch.compile(fp8.fp8_linear)
        rows.append({"gemm": f"linear {name} [{m}x{k}]@[{k}x{n}]", "bf16_ms": cuda_ms(run_bf16),
                     "fp8_eager_ms": cuda_ms(run_fp8), "fp8_compiled_ms": compiled_ms(lambda: run_fp8(compiled)),
                     "err_vs_dequant": [rel(a, b) for a, b in zip(got, deq)],
                     "err_vs_exact": [rel(a, b) for a, b in zip(got, exact)],
                     "bf16_err_vs_exact": [rel(torch.nn.functional.linear(x, w), exact[0])]})
    return rows


def grouped_rows(m: int, groups: int, shapes: dict) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    counts = torch.multinomial(torch.ones(groups), m, replacement=True, generator=gen).bincount(minlength=groups)
    offs = counts.cumsum(0).to(torch.int32).cuda()
    for name, (k, n) in shapes.items():
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = (torch.randn(groups, k, n, device="cuda") * k ** -0.5).to(torch.bfloat16)
        g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        y_kernel = fp8._grouped(*fp8.quantize_rows(x), *fp8.quantize_cols_t(w), offs, torch.bfloat16)
        exact = loop_mm(x.float(), w.float(), offs)
        deq = loop_mm(dequant(x, -1), dequant(w.transpose(-2, -1), -1).transpose(-2, -1), offs)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        fp8.fp8_grouped_mm(xr, wr, offs).backward(g)
        exact_gx = loop_mm(g.float(), w.float().transpose(-2, -1), offs)
        xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
        torch._grouped_mm(xb, wb, offs=offs).backward(g)

        def run_bf16():
            a, b = x.detach().requires_grad_(), w.detach().requires_grad_()
            torch._grouped_mm(a, b, offs=offs).backward(g)

        def run_fp8():
            a, b = x.detach().requires_grad_(), w.detach().requires_grad_()
            fp8.fp8_grouped_mm(a, b, offs).backward(g)

        rows.append({"gemm": f"grouped {name} [{m}x{k}]@[{groups}x{k}x{n}]", "bf16_ms": cuda_ms(run_bf16),
                     "fp8_eager_ms": cuda_ms(run_fp8), "fp8_compiled_ms": None,
                     "err_vs_dequant": rel(y_kernel, deq),
                     "err_vs_exact": [rel(y_kernel, exact), rel(xr.grad, exact_gx)],
                     "bf16_err_vs_exact": [rel(torch._grouped_mm(x, w, offs=offs), exact), rel(xb.grad, exact_gx)],
                     "grad_w_vs_bf16": rel(wr.grad, wb.grad)})
    return rows


def compiled_ms(fn) -> float | str:
    try:
        return cuda_ms(fn)
    except Exception as e:  # torch.compile around user Triton kernels: record why, keep the eager figures
        return f"{type(e).__name__}: {str(e)[:200]}"


def quant_kernel_rows() -> list[dict]:
    """The Triton quantizers against torch's `quantize` on the GPU (exact: the same IEEE division and cast)."""
    rows = []
    for shape in [(8192, 2048), (8192, 16384), (16, 2048, 16384), (1000, 3000)]:
        x = (torch.randn(*shape, device="cuda") * torch.logspace(-3, 3, shape[-1], device="cuda")).to(torch.bfloat16)
        checks = {}
        if x.dim() == 2:
            (q, s), (qr, sr) = fp8.quantize_rows(x), fp8.quantize(x, -1)
            checks["rows"] = [torch.equal(s, sr), int((q.float() != qr.float()).sum())]
        (q, s), (qr, sr) = fp8.quantize_cols_t(x), fp8.quantize(x.transpose(-2, -1), -1)
        checks["cols_t"] = [torch.equal(s, sr), int((q.float() != qr.float()).sum())]
        cols_ms = cuda_ms(lambda: fp8.quantize_cols_t(x))
        rows_ms = cuda_ms(lambda: fp8.quantize_rows(x)) if x.dim() == 2 else None
        rows.append({"shape": list(shape), "scales_equal_and_q_mismatches": checks, "rows_ms": rows_ms,
                     "cols_t_ms": cols_ms, "GB": x.numel() * 3 / 1e9})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=8192)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(0)
    h, i = 2048, 8192
    quant = quant_kernel_rows()
    for r in quant:
        print(json.dumps(r))
    rows = linear_rows(a.tokens, {"q/k/v/o": (3072, h), "gate": (2 * i, h), "up": (i, h), "down": (h, i)})
    rows += grouped_rows(2 * a.tokens, 16, {"wi_gate": (h, 2 * i), "wi_up": (h, i), "wo": (i, h)})
    with open(os.path.join(a.out, "fp8_check.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "quantizers": quant,
                   "rows": rows}, f, indent=1)
    print(f"{'gemm':48} {'bf16':>7} {'fp8 e':>7} {'fp8 c':>7} {'x':>5}  errors")
    for r in rows:
        errs = {k: v for k, v in r.items() if k not in ("gemm", "bf16_ms", "fp8_eager_ms", "fp8_compiled_ms")}
        c = r["fp8_compiled_ms"]
        print(f"{r['gemm']:48} {r['bf16_ms']:7.3f} {r['fp8_eager_ms']:7.3f} "
              f"{c if isinstance(c, float) else float('nan'):7.3f} {r['bf16_ms'] / r['fp8_eager_ms']:5.2f}  "
              f"{json.dumps(errs)}")




def breakdown(m: int, n: int, k: int) -> list[dict]:
    """Parts of one fp8 GEMM [m x k] @ [k x n]: the GEMM alone (row-scaled, tensor-scaled, bf16) and quantization."""
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    qa, sa = fp8.quantize(a, -1)
    qb, sb = fp8.quantize(b, -1)
    one = torch.ones((), device="cuda")
    q = torch.compile(fp8.quantize)
    parts = {
        "bf16 mm": lambda: a @ b.t(),
        "fp8 mm, row scales": lambda: torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb.t(),
                                                       out_dtype=torch.bfloat16),
        "fp8 mm, row scales, fast accum": lambda: torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb.t(),
                                                                  out_dtype=torch.bfloat16, use_fast_accum=True),
        "fp8 mm, tensor scale": lambda: torch._scaled_mm(qa, qb.t(), scale_a=one, scale_b=one,
                                                         out_dtype=torch.bfloat16),
        "quantize a rows, eager": lambda: fp8.quantize(a, -1),
        "quantize a rows, compiled": lambda: q(a, -1),
        "quantize a.t() rows, compiled": lambda: q(a.t(), -1),
        "quantize a rows, Triton": lambda: fp8.quantize_rows(a),
        "quantize a columns -> transposed, Triton": lambda: fp8.quantize_cols_t(a),
    }
    return [{"part": f"{name} [{m}x{k}]@[{k}x{n}]", "ms": cuda_ms(fn)} for name, fn in parts.items()]


def main_breakdown():
    rows = breakdown(8192, 16384, 2048) + breakdown(8192, 2048, 8192)
    for r in rows:
        print(f"{r['part']:60} {r['ms']:7.3f}")


if __name__ == "__main__":
    main_breakdown() if "--breakdown" in sys.argv else main()
