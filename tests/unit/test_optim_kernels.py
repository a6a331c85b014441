"""openmoe.optim_kernels.fused_adamw_ (lean ZeRO-1's --adamw_kernel step) against torch.optim.AdamW: three steps,
two parameter groups (with and without weight decay), odd sizes, bf16 gradients divided by a clipping divisor, the
bf16 copy of the result written where asked; the torch path here and the Triton kernel in Triton's interpreter.

Reference: torch.optim.AdamW's single-tensor implementation (foreach=False, fused=False) fed the same gradients in
fp32, already divided. fp32 rounding differs between the two op orders, so the tolerance is a few fp32 ulps
(rtol 2e-6; on the moments also 1e-6 of the largest, for elements near cancellation); the step counts are equal.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from openmoe.optim_kernels import check_adamw, fused_adamw_

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCALE = 2.5


def compare_with_torch_adamw(steps: int = 3) -> None:
    torch.manual_seed(0)
    shapes = [(37, 5), (1000,), (3,)]
    ref = [torch.randn(s) for s in shapes]
    ours = [p.clone() for p in ref]
    groups = lambda ps: [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]  # noqa: E731
    ref_opt = torch.optim.AdamW(groups(ref), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False, fused=False)
    opt = torch.optim.AdamW(groups(ours), lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    check_adamw(opt)
    for step in range(steps):
        grads = [torch.randn(s).bfloat16() for s in shapes]
        for p, g in zip(ref, grads):
            p.grad = g.float() / SCALE
        ref_opt.step()
        out = torch.empty(1000, dtype=torch.bfloat16)
        fused_adamw_(opt, ours, grads, SCALE, {id(ours[1]): out})
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)
            for key in ("exp_avg", "exp_avg_sq"):
                want = ref_opt.state[q][key]  # torch lerps the first moment: near-cancelling elements differ in ulps
                torch.testing.assert_close(opt.state[p][key], want, rtol=2e-6, atol=1e-6 * float(want.abs().max()))
            assert float(opt.state[p]["step"]) == float(ref_opt.state[q]["step"]) == step + 1
        assert torch.equal(out, ours[1].bfloat16())  # the written copy is the updated master, rounded


def test_torch_path_equals_torch_adamw():
    compare_with_torch_adamw()


def test_triton_kernel_equals_torch_adamw_in_the_interpreter():
    """The Triton kernel itself on the CPU (TRITON_INTERPRET=1, set before triton is imported: a subprocess)."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        import openmoe.optim_kernels as k
        assert k.HAS_TRITON
        k._adamw_torch = k._adamw_triton  # the CPU path runs the kernel (the interpreter takes CPU tensors)
        from tests.unit.test_optim_kernels import compare_with_torch_adamw
        compare_with_torch_adamw()
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-2000:] + res.stderr[-3000:]


@pytest.mark.parametrize("make, message", [
    (lambda ps: torch.optim.Adam(ps), r"implements torch.optim.AdamW; the optimizer is Adam"),
    (lambda ps: torch.optim.AdamW(ps, amsgrad=True), r"AdamW options \['amsgrad'\] are not supported"),
    (lambda ps: torch.optim.AdamW([p.detach().bfloat16() for p in ps]), r"fp32 master weights; got parameters of "
                                                                 r"\['torch.bfloat16'\]"),
])
def test_what_the_kernel_does_not_implement_is_refused(make, message):
    with pytest.raises(ValueError, match=message):
        check_adamw(make([torch.zeros(3, requires_grad=True)]))


def test_a_device_without_the_kernel_is_refused(monkeypatch):
    import openmoe.optim_kernels as k

    meta = torch.optim.AdamW([torch.zeros(3, device="meta", requires_grad=True)])
    monkeypatch.setattr(k, "HAS_TRITON", False)
    with pytest.raises(ValueError, match=r"runs a Triton kernel on CUDA \(torch ops on the CPU\); the parameters "
                                         r"are on \['meta'\] and triton is not installed$"):
        check_adamw(meta)
    check_adamw(torch.optim.AdamW([torch.zeros(3, requires_grad=True)]))  # the CPU runs the torch path
