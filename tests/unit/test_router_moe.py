import pytest
import torch

from openmoe.config import preset
from openmoe.moe import OpenMoeSparseMLP, reference_moe_forward
from openmoe.router import capacity, route


def route_logits(logits, k=2, cf=1.0, min_cap=1, drop=True, mask=None):
    """Router on hand-built logits: identity gate weight makes logits == x."""
    e = logits.shape[1]
    return route(logits, torch.eye(e), k, cf, min_cap, drop, mask)


def test_capacity_rule():
    assert capacity(num_tokens=10, num_experts=4, top_k=2, capacity_factor=1.25, min_capacity=4) == 6  # floor(6.25)
    assert capacity(10, 4, 2, 1.0, 4) == 6  # 5 -> rounded up to even
    assert capacity(8, 4, 2, 0.5, 4) == 4  # 2 -> min_capacity
    assert capacity(4096, 32, 2, 1.25, 4) == 320


def test_top2_choices_and_priority_first_choices_before_second():
    # t0: e1 > e0; t1: e0 > e1; t2: e1 > e2. Capacity 2.
    logits = torch.tensor([[2.0, 3.0, 0.0], [3.0, 2.0, 0.0], [0.0, 3.0, 2.0]])
    r = route_logits(logits, cf=1.0, min_cap=2)  # floor(2*1*3/3)=2
    assert r.capacity == 2
    assert r.expert_idx.tolist() == [[1, 0], [0, 1], [1, 2]]
    # expert 1 receives first choices of t0 and t2 (slots 0, 1) before t1's second choice (slot 2 -> dropped),
    # although t1 comes before t2 in token order.
    assert r.slot.tolist() == [[0, 1], [0, 2], [1, 0]]
    assert r.keep.tolist() == [[True, True], [True, False], [True, True]]
    assert r.tokens_per_expert.tolist() == [2, 3, 1]
    assert r.dropped_fraction.item() == pytest.approx(1 / 6)
    probs = logits.softmax(-1)
    assert torch.allclose(r.combine_weight[0], probs[0, [1, 0]])  # raw softmax probabilities, not renormalised
    assert r.combine_weight[1, 1] == 0


def test_token_order_within_a_choice_rank():
    logits = torch.tensor([[5.0, 1.0, 0.0]] * 5)  # everyone: e0 first, e1 second
    r = route_logits(logits, cf=0.6, min_cap=2)  # floor(2*0.6*5/3)=2
    assert r.slot[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert r.keep[:, 0].tolist() == [True, True, False, False, False]
    assert r.keep[:, 1].tolist() == [True, True, False, False, False]


def test_train_vs_eval_capacity():
    layer = OpenMoeSparseMLP(preset("tiny"))
    torch.nn.init.normal_(layer.gate_weight)
    x = torch.randn(64, 64)
    layer.train()
    assert layer.route(x, None).capacity == capacity(64, 4, 2, 1.25, 4) == 40
    layer.eval()
    assert layer.route(x, None).capacity == capacity(64, 4, 2, 2.0, 4) == 64


def test_dropless_and_padding_never_routed():
    logits = torch.tensor([[5.0, 1.0, 0.0]] * 5)
    r = route_logits(logits, cf=0.0)
    assert r.keep.all() and r.capacity == 5
    mask = torch.tensor([True, False, True, True, False])
    r = route_logits(logits, cf=0.6, min_cap=2, mask=mask)
    assert r.keep[:, 0].tolist() == [True, False, True, False, False]  # padded t1 does not take a slot
    assert r.tokens_per_expert.tolist() == [3, 3, 0]


def moe_layer(seed=0, **overrides):
    torch.manual_seed(seed)
    layer = OpenMoeSparseMLP(preset("tiny", **overrides)).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


@pytest.mark.parametrize("cf", [0.5, 1.25, 0.0])  # heavy dropping, mild dropping, dropless
def test_vectorised_moe_equals_reference_loop(cf):
    layer = moe_layer()
    layer.capacity_factor_train = cf
    x = torch.randn(3, 7, 64, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[2, 5:] = False
    out, aux = layer(x, mask)
    ref, r = reference_moe_forward(layer, x, mask)
    if cf == 0.5:
        assert aux.dropped_fraction > 0.2
    else:
        assert aux.dropped_fraction < 0.2
    assert torch.allclose(out, ref, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *layer.parameters()], g)
    ref_grads = torch.autograd.grad(ref, [x, *layer.parameters()], g)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-10)
    assert out[2, 5:].abs().max() == 0  # padding tokens get no expert output


@pytest.mark.parametrize("cf", [0.5, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_experts_equal_bmm_reference(cf, dtype):
    layer = moe_layer().to(dtype)
    layer.capacity_factor_train = cf
    x = torch.randn(2, 9, 64, dtype=dtype, requires_grad=True)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 7:] = False
    g = torch.randn(2, 9, 64, dtype=dtype)
    results = []
    for impl in ("bmm", "grouped"):
        layer.expert_impl = impl
        out, aux = layer(x, mask)
        results.append((out, torch.autograd.grad(out, [x, *layer.parameters()], g)))
    (a, ga), (b, gb) = results
    # same products, different summation order: relative error of the norm, fp32 ~1e-7, bf16 ~4e-3 per op
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for u, v in zip((a, *ga), (b, *gb)):
        assert ((u.float() - v.float()).norm() / v.float().norm()).item() < tol


class _GarbageTail(torch.autograd.Function):
    """Identity except rows [n:] become NaN, forward and backward: what a grouped GEMM may leave in the rows past
    its last group offset, which it never writes."""

    @staticmethod
    def forward(ctx, x, n):
        ctx.n = n
        y = x.clone()
        y[n:] = float("nan")
        return y

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g[ctx.n:] = float("nan")
        return g, None


def test_grouped_path_masks_rows_past_the_last_offset(monkeypatch):
    layer = moe_layer().float()  # _grouped_mm has no fp64
    layer.capacity_factor_train = 0.5  # many dropped choices, i.e. rows past the last offset
    x = torch.randn(2, 9, 64, dtype=torch.float32, requires_grad=True)
    g = torch.randn_like(x)
    layer.expert_impl = "bmm"
    ref_out, _ = layer(x)
    ref_grads = torch.autograd.grad(ref_out, [x, *layer.parameters()], g)
    original = type(layer.experts).forward_grouped

    def leaky(self, rows, counts):
        n = int(counts.sum())
        return _GarbageTail.apply(original(self, _GarbageTail.apply(rows, n), counts), n)

    monkeypatch.setattr(type(layer.experts), "forward_grouped", leaky)
    layer.expert_impl = "grouped"
    out, aux = layer(x)
    assert aux.dropped_fraction > 0.2
    grads = torch.autograd.grad(out, [x, *layer.parameters()], g)
    assert torch.allclose(out, ref_out, atol=1e-5)  # same products as bmm, other summation order
    for a, b in zip(grads, ref_grads):
        assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("impl, cf", [("bmm", 1.25), ("grouped", 1.25), ("grouped", 0.0)])
def test_moe_layer_has_no_host_sync(impl, cf, monkeypatch):
    """Capacity routing (and dropless routing on the grouped path) never reads a device value on the host: every
    op whose output size depends on data (nonzero, bincount, item, tolist, masked indexing, repeat_interleave
    without output_size) is made to raise. On a GPU such an op would stall the host until the device catches up."""
    layer = moe_layer().float()
    layer.capacity_factor_train, layer.expert_impl = cf, impl
    x = torch.randn(2, 9, 64, dtype=torch.float32, requires_grad=True)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False

    def forbidden(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"host sync in the MoE hot path: {name}")
        return fail

    for name in ("nonzero", "item", "tolist", "bincount", "masked_select", "unique"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name), raising=False)
        monkeypatch.setattr(torch, name, forbidden(name), raising=False)
    out, aux = layer(x, mask)
    out.square().sum().backward()
    assert x.grad is not None and layer.experts.wo.grad is not None


def slots_by_loop(expert_idx, token_mask, num_experts):
    """The priority rule written out: walk choice ranks, then tokens in order; each real choice takes its expert's
    next free slot (T5X's batch-prioritised top-k); masked tokens take none (slot 0)."""
    t, k = expert_idx.shape
    used, slot = [0] * num_experts, [[0] * k for _ in range(t)]
    for j in range(k):
        for i in range(t):
            if token_mask[i]:
                e = int(expert_idx[i, j])
                slot[i][j], used[e] = used[e], used[e] + 1
    return slot, used


@pytest.mark.parametrize("t,k,e", [(1, 1, 1), (7, 2, 3), (64, 2, 32), (200, 3, 5)])
def test_slot_assignment_equals_the_priority_rule(t, k, e):
    from openmoe.router import assign_slots

    g = torch.Generator().manual_seed(t * 31 + k)
    for skew in (False, True):
        scores = torch.rand(t, e, generator=g) + (torch.arange(e) == 0) * skew  # skew: expert 0 first for everyone
        expert_idx = scores.topk(k, dim=-1).indices
        token_mask = torch.rand(t, generator=g) > 0.2
        slot, counts = assign_slots(expert_idx, token_mask, e)
        want_slot, want_counts = slots_by_loop(expert_idx, token_mask, e)
        assert slot.tolist() == want_slot and counts.tolist() == want_counts


def test_dropless_route_without_sizing_reads_no_slots():
    logits = torch.randn(9, 4)
    mask = torch.tensor([True] * 7 + [False] * 2)
    r = route(logits, torch.eye(4), 2, 0.0, 1, True, mask, size_dropless=False)
    sized = route(logits, torch.eye(4), 2, 0.0, 1, True, mask)
    assert r.slot is None and r.capacity == 0 and sized.capacity == int(sized.tokens_per_expert.max())
    assert torch.equal(r.tokens_per_expert, sized.tokens_per_expert) and int(r.tokens_per_expert.sum()) == 14
    assert torch.equal(r.keep, sized.keep) and torch.equal(r.combine_weight, sized.combine_weight)


def test_sort_by_expert_is_a_stable_sort_up_to_the_largest_expert_count():
    """The int16 sort keeps equal keys in their order and handles the largest key a config allows (num_experts, the
    "no expert" key, at MAX_EXPERTS); a config with more experts is refused."""
    from openmoe.config import MAX_EXPERTS
    from openmoe.router import sort_by_expert

    g = torch.Generator().manual_seed(0)
    for top in (3, MAX_EXPERTS):
        keys = torch.randint(0, top + 1, (500,), generator=g)
        keys[::7] = top  # many ties at the largest key
        want = sorted(range(len(keys)), key=lambda i: (int(keys[i]), i))  # stable by construction
        assert sort_by_expert(keys).tolist() == want
    with pytest.raises(ValueError, match=rf"^num_experts \({MAX_EXPERTS + 1}\) must be in \[1, {MAX_EXPERTS}\] "):
        preset("tiny", num_experts=MAX_EXPERTS + 1, router_topk=2)
