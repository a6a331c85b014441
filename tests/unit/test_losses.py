import math

import pytest
import torch

from openmoe.config import preset
from openmoe.losses import cross_entropy_sums, fused_lm_loss, lm_loss, router_aux_loss, router_z_loss
from openmoe.model import OpenMoeForCausalLM


def test_router_aux_loss_hand_formula():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5]])
    idx = torch.tensor([[0, 1], [1, 2], [0, 2], [2, 1]])
    mask = torch.ones(4, dtype=torch.bool)
    f = torch.tensor([2 / 4, 3 / 4, 3 / 4])  # fraction of tokens whose top-2 contains e
    p = probs.mean(0)
    assert router_aux_loss(probs, idx, mask).item() == pytest.approx(3 * (f * p).sum().item())
    # uniform routing reaches K
    uniform = torch.full((6, 3), 1 / 3)
    idx_u = torch.tensor([[0, 1], [1, 2], [2, 0]] * 2)
    assert router_aux_loss(uniform, idx_u, torch.ones(6, dtype=torch.bool)).item() == pytest.approx(2.0)
    # masked tokens do not count
    mask2 = torch.tensor([True, True, False, False])
    f2, p2 = torch.tensor([1 / 2, 2 / 2, 1 / 2]), probs[:2].mean(0)
    assert router_aux_loss(probs, idx, mask2).item() == pytest.approx(3 * (f2 * p2).sum().item())


def test_router_z_loss_hand_formula():
    logits = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 3.0]])
    mask = torch.tensor([True, True, False])
    want = (math.log(math.e + math.e**2) ** 2 + math.log(1 + math.e**-1) ** 2) / 2
    assert router_z_loss(logits, mask).item() == pytest.approx(want)


def test_label_smoothed_ce_and_z_hand_formula():
    torch.manual_seed(0)
    logits = torch.randn(5, 7, dtype=torch.float64)
    labels = torch.tensor([3, -100, 0, 6, 2])
    ls = 0.1
    ce_sum, z_sum = cross_entropy_sums(logits, labels, ls)
    want_ce = want_z = 0.0
    for t in range(5):
        if labels[t] < 0:
            continue
        q = torch.full((7,), ls / 6, dtype=torch.float64)  # FLOAT soft targets
        q[labels[t]] = 1 - ls
        want_ce += -(q * logits[t].log_softmax(-1)).sum().item()
        want_z += logits[t].logsumexp(-1).item() ** 2
    assert ce_sum.item() == pytest.approx(want_ce, rel=1e-10)
    assert z_sum.item() == pytest.approx(want_z, rel=1e-10)


def test_label_smoothing_gives_log_vocab_not_vocab_times_log_vocab():
    torch.manual_seed(0)
    cfg = preset("tiny", label_smoothing=0.1, z_loss_factor=0.0)
    model = OpenMoeForCausalLM(cfg)
    ids = torch.randint(2, cfg.vocab_size, (2, 32))
    out = model(ids, labels=ids)
    assert abs(out.ce_loss.item() - math.log(cfg.vocab_size)) < 0.1  # the boolean-target bug gave ~1e4 here


def test_padding_does_not_change_loss():
    torch.manual_seed(0)
    model = OpenMoeForCausalLM(preset("tiny")).eval()
    ids = torch.randint(2, 1024, (1, 12))
    ids[0, 0] = 0
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    labels = padded.clone()
    labels[0, 12:] = -100
    mask = (torch.arange(17) < 12).long()[None]
    a = model(ids, labels=ids)
    b = model(padded, attention_mask=mask, labels=labels)
    assert b.num_tokens.item() == a.num_tokens.item() == 11
    for part in ("loss", "ce_loss", "z_loss", "aux_loss", "router_z_loss"):
        assert getattr(a, part).item() == pytest.approx(getattr(b, part).item(), rel=1e-5), part


def test_loss_parts_sum_and_factors():
    torch.manual_seed(0)
    model = OpenMoeForCausalLM(preset("tiny"))
    ids = torch.randint(2, 1024, (2, 16))
    out = model(ids, labels=ids)
    assert out.loss.item() == pytest.approx((out.ce_loss + out.z_loss + out.aux_loss + out.router_z_loss).item())
    aux = torch.stack([m.aux_loss for m in out.moe]).mean()
    assert out.aux_loss.item() == pytest.approx(0.01 * aux.item())
    assert len(out.moe) == 2  # tiny: 4 layers, interval 2


def test_chunked_head_equals_unchunked_values_and_grads():
    torch.manual_seed(0)
    h = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[1, 4:] = -100
    full = lm_loss(h, w, labels, 0.1, 0.01, chunk_size=None)
    chunked = lm_loss(h, w, labels, 0.1, 0.01, chunk_size=5)
    for a, b in zip(full, chunked):
        assert torch.allclose(a, b, atol=1e-12)
    g_full = torch.autograd.grad(full[0] + full[1], [h, w])
    g_chunk = torch.autograd.grad(chunked[0] + chunked[1], [h, w])
    for a, b in zip(g_full, g_chunk):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("ls, zf", [(0.1, 0.01), (0.0, 0.0), (0.0, 1e-4)])
def test_fused_head_loss_equals_autograd_reference(ls, zf):
    """Gradient computed in the forward pass == autograd through the unchunked head, including a scaled incoming
    gradient (as with an fp16 loss scale or gradient accumulation) and ignored positions."""
    torch.manual_seed(1)
    h = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[1, 4:] = -100
    ce, z, n = lm_loss(h, w, labels, ls, zf, chunk_size=None)
    total, ce_f, z_f, n_f = fused_lm_loss(h, w, labels, ls, zf, chunk_size=5)
    assert n == n_f == 11  # 8 + 3 shifted labels
    assert torch.allclose(ce_f, ce, atol=1e-12) and torch.allclose(z_f, z, atol=1e-12)
    assert torch.allclose(total, ce + z, atol=1e-12)
    assert not ce_f.requires_grad and not z_f.requires_grad
    want = torch.autograd.grad(3.0 * (ce + z), [h, w])
    got = torch.autograd.grad(3.0 * total, [h, w])
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_head_loss_compiled_chunk_matches(dtype, tol):
    """The compiled chunk (gradient cast to the weight dtype inside the kernel) == the eager chunk; in bf16 both
    round the same fp32 gradient once, so they differ by at most the matmul's summation order."""
    torch.manual_seed(2)
    h = torch.randn(1, 7, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(40, 16, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 40, (1, 7))
    labels[0, 5] = -100  # an ignored position inside the second chunk
    plain = fused_lm_loss(h, w, labels, 0.1, 0.01, chunk_size=4)
    try:
        compiled = fused_lm_loss(h, w, labels, 0.1, 0.01, chunk_size=4, compile_chunk=True)
    except Exception as e:  # no inductor toolchain on this machine: the eager path is the one that runs
        pytest.skip(f"torch.compile unavailable here: {type(e).__name__}")
    assert torch.allclose(plain[0], compiled[0], atol=1e-5)
    ga = torch.autograd.grad(plain[0], [h, w])
    gb = torch.autograd.grad(compiled[0], [h, w])
    for a, b in zip(ga, gb):
        assert a.dtype == b.dtype == dtype
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < tol


def test_fused_head_loss_refuses_a_second_backward():
    """Its backward scales the stored gradients in place: a retained graph's second backward must fail loudly
    rather than return gradients scaled twice."""
    torch.manual_seed(4)
    h = torch.randn(1, 6, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    total, *_ = fused_lm_loss(h, w, torch.randint(0, 20, (1, 6)), 0.0, 0.0, chunk_size=3)
    (2 * total).backward(retain_graph=True)
    first = w.grad.clone()
    with pytest.raises(RuntimeError, match=r"fused_lm_loss's backward ran twice on one graph \(retain_graph\)"):
        (2 * total).backward()
    assert torch.equal(w.grad, first)


def test_fused_head_loss_fp16_under_a_loss_scale():
    """fp16 with ColossalAI's initial loss scale (2^16, beyond fp16's largest finite 65504) and ~1e3 tokens: the
    gradient is finite and close to the fp64 autograd one (neither the scale nor grad / T may round away)."""
    torch.manual_seed(3)
    h64 = torch.randn(4, 257, 32, dtype=torch.float64)
    w64 = torch.randn(300, 32, dtype=torch.float64) * 0.1
    labels = torch.randint(0, 300, (4, 257))
    h, w = h64.half().requires_grad_(True), w64.half().requires_grad_(True)
    total, *_ = fused_lm_loss(h, w, labels, 0.1, 1e-4, chunk_size=256)
    got = torch.autograd.grad(total * 65536.0, [h, w])
    h64.requires_grad_(True), w64.requires_grad_(True)
    ce, z, _ = lm_loss(h64.half().double(), w64.half().double(), labels, 0.1, 1e-4, chunk_size=None)
    want = torch.autograd.grad((ce + z) * 65536.0, [h64, w64])
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        assert ((a.double() - b).norm() / b.norm()).item() < 5e-3
