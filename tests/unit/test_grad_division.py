"""divide_gradients (openmoe/backend/colossal.py): the clipping / fp16-unscaling divisor applied inside the fused
AdamW kernel gives the update of dividing the gradients first; other optimizers get the gradients divided in place."""

import pytest
import torch

from openmoe.backend.colossal import divide_gradients


def _params(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 7, generator=g).requires_grad_(), torch.randn(11, generator=g).requires_grad_()]


@pytest.mark.parametrize("div", [1.0, 3.7])
def test_fused_adamw_divides_inside_its_kernel(div):
    fused_p, ref_p = _params(0), _params(0)
    grads = [torch.randn_like(p) for p in fused_p]
    kw = dict(lr=0.1, betas=(0.9, 0.95), weight_decay=0.1)
    fused = torch.optim.AdamW(fused_p, fused=True, **kw)
    ref = torch.optim.AdamW(ref_p, foreach=False, **kw)
    for step in range(3):  # the divisor is set (or cleared) for each step; moments see the divided gradients
        d = div if step != 1 else 1.0
        for p, r, g in zip(fused_p, ref_p, grads):
            p.grad, r.grad = g.clone(), g / d
        divide_gradients(fused, [p.grad for p in fused_p], d)
        assert (fused.grad_scale is None) == (d == 1.0)
        fused.step()
        ref.step()
        for p, r in zip(fused_p, ref_p):
            torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
    for p, r in zip(fused_p, ref_p):
        torch.testing.assert_close(fused.state[p]["exp_avg_sq"], ref.state[r]["exp_avg_sq"], rtol=1e-6, atol=1e-9)


def test_other_optimizers_get_the_gradients_divided_in_place():
    params = _params(1)
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    sgd = torch.optim.SGD(params, lr=1.0)
    divide_gradients(sgd, [p.grad for p in params], 4.0)
    assert not hasattr(sgd, "grad_scale")
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g / 4.0)
    divide_gradients(sgd, [p.grad for p in params], 1.0)  # divisor 1: untouched
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g / 4.0)
