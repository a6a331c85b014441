import random

import pytest
import torch

from openmoe.config import preset
from openmoe.moe import OpenMoeSparseMLP
from openmoe.parallel.load_balance import BiasBalancer, apply_swaps, plan_swaps, rank_loads


def test_plan_swaps_evens_out_a_skewed_placement():
    # 4 ranks x 2 slots: the two hottest experts start on rank 0
    loads = [900, 800, 100, 120, 300, 280, 90, 110]
    before = max(rank_loads(loads, 4))
    swaps = plan_swaps(loads, 4)
    order = apply_swaps(list(range(8)), swaps)
    after = max(rank_loads([loads[x] for x in order], 4))
    assert before == 1700 and after <= 1010, (swaps, after)
    assert sorted(order) == list(range(8))  # a permutation: every expert still placed once
    for s in swaps:  # same local index on both ranks (ZeRO partitions line up)
        assert s.slot_a % 2 == s.slot_b % 2


def test_plan_swaps_leaves_a_balanced_placement_alone():
    assert plan_swaps([100, 100, 101, 99], 2) == []


def test_plan_swaps_never_worse_on_random_loads():
    rng = random.Random(0)
    for _ in range(50):
        loads = [rng.randint(0, 1000) for _ in range(16)]
        order = apply_swaps(list(range(16)), plan_swaps(loads, 4, beam_width=4))
        assert max(rank_loads([loads[x] for x in order], 4)) <= max(rank_loads(loads, 4))


def test_plan_swaps_rejects_bad_sizes():
    with pytest.raises(ValueError, match=r"number of slots \(6\) must be divisible by the number of EP ranks \(4\)"):
        plan_swaps([1] * 6, 4)


def test_bias_balancing_drives_a_skewed_router_towards_uniform_load():
    torch.manual_seed(0)
    layer = OpenMoeSparseMLP(preset("tiny"))
    torch.nn.init.normal_(layer.gate_weight, std=0.02)
    with torch.no_grad():
        layer.gate_weight[0] += 0.05  # inputs share a mean direction: expert 0 wins almost every token
    balancer = BiasBalancer(num_layers=1, num_experts=4, rate=5e-3)
    balancer.attach([layer])

    def load(x):
        return layer.route(x, None).tokens_per_expert.float()

    x_eval = torch.randn(2048, 64) + 0.5
    skew_before = (load(x_eval).max() / load(x_eval).mean()).item()
    recent = torch.zeros(4)
    for step in range(400):
        counts = load(torch.randn(256, 64) + 0.5)
        balancer.update(counts[None])
        if step >= 300:
            recent += counts
    # the sign rule oscillates around balance step to step; over the last 100 steps the load is near uniform
    skew_after = (recent.max() / recent.mean()).item()
    assert skew_before == 2.0 and skew_after < 1.1, (skew_before, skew_after)
    assert (load(x_eval).max() / load(x_eval).mean()).item() < 1.35
    assert balancer.bias[0, 0] < 0  # the overloaded expert was pushed down
    # combine weights stay the raw probabilities: the bias only changes which experts are chosen
    r = layer.route(x_eval[:8], None)
    assert torch.allclose(r.combine_weight, r.probs.gather(1, r.expert_idx))
    state = balancer.state_dict()
    fresh = BiasBalancer(1, 4)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.bias, balancer.bias)
    with pytest.raises(ValueError, match=r"saved router bias has shape \(1, 4\), model needs \(2, 4\)"):
        BiasBalancer(2, 4).load_state_dict(state)
