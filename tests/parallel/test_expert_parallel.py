"""Our expert-parallel MoE layer on 2 gloo ranks == the single-device MoE layer (outputs, router losses, grads)."""

import pytest
import torch

from tests.helpers import launch
from tests.parallel.ep_workers import ep_layer_worker, make_inputs, make_layer

WORLD = 2


@pytest.mark.parametrize("cf", [0.75, 0.0], ids=["capacity_with_drops", "dropless"])
def test_ep_layer_matches_single_device(cf, tmp_path):
    launch(ep_layer_worker, WORLD, cf, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    x, mask, grad = make_inputs(WORLD)
    ref = make_layer(cf)
    # Capacity (and priority) are per rank's local batch, as in the original: the single-device reference runs each
    # rank's tokens as its own batch; the experts' gradients are the sum over both ranks' tokens.
    xs = x.clone().requires_grad_(True)
    outs, drops = [], 0.0
    for r in range(WORLD):
        out, aux = ref(xs[r], mask[r])
        outs.append(out)
        drops += float(aux.dropped_fraction)
        assert torch.allclose(ranks[r]["aux"], aux.aux_loss, atol=1e-12)
        assert torch.allclose(ranks[r]["z"], aux.z_loss, atol=1e-12)
        assert torch.equal(ranks[r]["counts"], aux.tokens_per_expert)
    if cf > 0:
        assert drops > 0.1  # the capacity case really drops tokens
    torch.stack(outs).mul(grad).sum().backward()
    for r in range(WORLD):
        assert torch.allclose(ranks[r]["out"], outs[r], atol=1e-12)
        assert torch.allclose(ranks[r]["x_grad"], xs.grad[r], atol=1e-12)
    # router weight is replicated: its gradient is local; the sum over ranks is the single-device gradient
    assert torch.allclose(sum(rk["gate_grad"] for rk in ranks), ref.gate_weight.grad, atol=1e-12)
    for r in range(WORLD):
        lo, hi = ranks[r]["slice"]
        for name, g in ranks[r]["expert_grads"].items():
            want = getattr(ref.experts, name).grad[lo:hi] / WORLD  # 1/ep scale: see expert_parallel.py
            assert torch.allclose(g, want, atol=1e-12), name
