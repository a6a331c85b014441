import random
import threading

import pytest
import torch

from openmoe.config import preset
from openmoe.moe import OpenMoeSparseMLP
from openmoe.parallel import load_balance
from openmoe.parallel.load_balance import (
    BiasBalancer,
    ExpertPlacement,
    LayerRebalance,
    Swap,
    apply_swaps,
    check_load_balance,
    exchange_plan,
    plan_swaps,
    rank_loads,
    slot_ranges,
)
from openmoe.parallel.sizes import ParallelSizes
from openmoe.train.config import RunConfig


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


def test_placement_plans_records_and_translates_to_logical_order():
    # 2 layers, 6 experts on 2 EP ranks (3 slots each): layer 0 is skewed towards rank 0, layer 1 is balanced
    placement = ExpertPlacement(["model.layers.1.mlp", "model.layers.3.mlp"], num_experts=6, num_ranks=2)
    for _ in range(2):  # counts add up over steps
        placement.record(torch.tensor([[200.0, 150, 100, 5, 10, 15], [50, 50, 50, 50, 50, 50]]))
    plans = placement.plan()
    assert plans == [[Swap(0, 3)], []]  # the busiest expert trades with rank 1's slot of the same local index
    assert placement.commit(plans) == [[3, 1, 2, 0, 4, 5], list(range(6))]
    assert placement.slots.tolist() == [[3, 1, 2, 0, 4, 5], list(range(6))] and not placement.counts.any()
    # a second rebalance composes: slots keep naming logical experts (counts are per physical slot)
    placement.record(torch.tensor([[10.0, 300, 200, 10, 5, 10], [0, 0, 0, 0, 0, 0]]))
    assert placement.plan() == [[Swap(1, 4)], []]
    placement.commit(placement.plan())
    assert placement.slots[0].tolist() == [3, 4, 2, 0, 1, 5]
    # physical tensors (row s = slot s) back to logical order, only for the router rows and experts of MoE layers
    phys = torch.arange(6.0)[:, None].expand(6, 3)  # row s holds s
    sd = {"model.layers.1.mlp.gate_weight": phys, "model.layers.1.mlp.experts.wo": phys,
          "model.layers.1.shared_experts.down_proj.weight": phys, "model.layers.3.mlp.gate_weight": phys}
    out = placement.to_logical_state_dict(sd)
    # logical row e = the slot holding expert e: expert 0 is in slot 3, expert 1 in slot 4, ...
    assert out["model.layers.1.mlp.gate_weight"][:, 0].tolist() == [3, 4, 2, 0, 1, 5]
    assert torch.equal(out["model.layers.1.mlp.experts.wo"], out["model.layers.1.mlp.gate_weight"])
    assert out["model.layers.1.shared_experts.down_proj.weight"] is phys  # not per expert: untouched
    assert torch.equal(out["model.layers.3.mlp.gate_weight"], phys)  # layer 1 never moved
    fresh = ExpertPlacement(placement.layer_names, 6, 2)
    fresh.load_state_dict(placement.state_dict())
    assert torch.equal(fresh.slots, placement.slots)
    with pytest.raises(ValueError, match=r"saved expert placement is for \(2, 6\) \(layers, experts\) over 2 EP "
                                         r"ranks; this run has \(2, 6\) over 3"):
        ExpertPlacement(placement.layer_names, 6, 3).load_state_dict(placement.state_dict())


def test_permuting_router_rows_with_experts_keeps_the_moe_function():
    """Why the EP layer needs no index map after a move: gate row s scores whatever expert slot s holds."""
    torch.manual_seed(0)
    layer = OpenMoeSparseMLP(preset("tiny"))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    layer.selection_bias = torch.tensor([0.01, -0.02, 0.0, 0.03])
    x = torch.randn(2, 24, 64)
    y, aux = layer(x)
    order = torch.tensor([2, 3, 0, 1])  # new slot s takes old slot order[s]
    with torch.no_grad():
        layer.gate_weight.copy_(layer.gate_weight[order])
        for p in layer.experts.parameters():
            p.copy_(p[order])
    layer.selection_bias = layer.selection_bias[order]
    y2, aux2 = layer(x)
    assert (y2 - y).abs().max() < 1e-5 * y.abs().max()  # capacity slots and drops are per expert, not per label
    assert torch.equal(aux2.tokens_per_expert, aux.tokens_per_expert[order])
    assert torch.allclose(aux2.aux_loss, aux.aux_loss) and torch.allclose(aux2.z_loss, aux.z_loss)


def test_exchange_plan_and_slot_ranges():
    # 3 ranks x 2 slots; slot 1 <-> 5 then slot 0 <-> 2: rank 0 gets slot 0 from rank 1, slot 1 from rank 2
    order = apply_swaps(list(range(6)), [Swap(1, 5), Swap(0, 2)])
    assert exchange_plan(order, 3, 0) == ([1, 2], [1, 2])
    assert exchange_plan(order, 3, 1) == ([0, 1], [0, 1])  # slot 3 stays
    with pytest.raises(ValueError, match=r"slot 0 would take slot 3: expert moves must keep the local index"):
        exchange_plan(apply_swaps(list(range(6)), [Swap(0, 3)]), 3, 0)
    # a ZeRO shard [5, 12) of a [3 slots x 4] tensor: slot 0 outside, slot 1 = [5, 8), slot 2 = [8, 12)
    assert slot_ranges(5, 7, 4, 3) == [(0, 0), (0, 3), (3, 7)]
    assert slot_ranges(8, 6, 4, 3) == [(0, 0), (0, 0), (0, 4)]  # the last 2 elements are padding


class _ThreadGroup:
    """Stands in for a process group whose ranks are threads: all_to_all_single through a shared mailbox."""

    def __init__(self, size: int):
        self.size, self.barrier, self.box, self.local = size, threading.Barrier(size), {}, threading.local()

    def all_to_all_single(self, out, inp, out_splits, in_splits, group):
        me = self.local.rank
        for dst, chunk in enumerate(inp.split(in_splits)):
            self.box[me, dst] = chunk.clone()
        self.barrier.wait()
        got = [self.box[src, me] for src in range(self.size)]
        assert [g.numel() for g in got] == out_splits
        out.copy_(torch.cat(got))
        self.barrier.wait()


@pytest.mark.parametrize("num_ranks,num_local,moe_dp", [(2, 2, 1), (3, 2, 2), (4, 3, 3)])
def test_slot_exchange_moves_every_zero_shard_with_its_expert(monkeypatch, num_ranks, num_local, moe_dp):
    """The real exchange_slots on every (EP rank, MoE-DP rank) shard, with padding and shard boundaries inside
    slots: afterwards each rank's shard is the shard of the permuted full tensor."""
    slot_numel = 7  # odd: shard boundaries fall inside slots
    rng = random.Random(num_ranks * 10 + moe_dp)
    full = torch.randn(num_ranks, num_local * slot_numel)  # each EP rank's local expert tensor, flattened
    order = list(range(num_ranks * num_local))
    for _ in range(4):  # random same-local-index swaps
        i, a, b = rng.randrange(num_local), *rng.sample(range(num_ranks), 2)
        order = apply_swaps(order, [Swap(a * num_local + i, b * num_local + i)])
    want = full.view(-1, slot_numel)[torch.tensor(order)].view(num_ranks, -1)
    group = _ThreadGroup(num_ranks)
    monkeypatch.setattr(load_balance.dist, "all_to_all_single", group.all_to_all_single)
    monkeypatch.setattr(load_balance.dist, "get_world_size", lambda g: num_ranks)
    numel = num_local * slot_numel
    chunk = -(-numel // moe_dp)  # ZeRO: padded to a multiple of moe_dp, then split evenly
    for k in range(moe_dp):  # each MoE-DP rank's EP group runs its own exchange
        padded = torch.nn.functional.pad(full, (0, chunk * moe_dp - numel))
        shards = [padded[r, k * chunk:(k + 1) * chunk].clone() for r in range(num_ranks)]

        def run(r):
            group.local.rank = r
            src, dst = exchange_plan(order, num_ranks, r)
            load_balance.exchange_slots(shards[r], k * chunk, slot_numel, src, dst, r, group)

        threads = [threading.Thread(target=run, args=(r,)) for r in range(num_ranks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        want_padded = torch.nn.functional.pad(want, (0, chunk * moe_dp - numel))
        for r in range(num_ranks):
            assert torch.equal(shards[r], want_padded[r, k * chunk:(k + 1) * chunk]), (k, r)


def test_rebalance_report_names_experts_as_swaps_go():
    report = LayerRebalance(0, [900.0, 100.0], [500.0, 500.0], [(1, 3)])
    assert report.describe("model.layers.1.mlp") == ("model.layers.1.mlp: EP-rank load max/mean 1.800 -> 1.000, "
                                                     "experts swapped: 1<->3")


@pytest.mark.parametrize("args,sizes,message", [
    (dict(load_balance_interval=0), dict(ep=2, pp=1),
     r"--load_balance_interval \(0\) must be >= 1 \(steps between rebalances\)"),
    (dict(), dict(ep=1, pp=1), r"--load_balance moves experts between expert-parallel ranks, but ep_size is 1; "
                               r"accepted: ep_size >= 2"),
    (dict(plugin="hybrid"), dict(ep=2, pp=2),
     r"--load_balance is not supported with pipeline parallelism yet \(pp_size 2\); accepted: pp_size 1"),
])
def test_check_load_balance_names_the_values(args, sizes, message):
    world = sizes["ep"] * sizes["pp"]
    parallel = ParallelSizes(world=world, moe_dp=1, dp=world // sizes["pp"], **sizes)
    with pytest.raises(ValueError, match=message):
        check_load_balance(RunConfig.from_flat(load_balance=True, **args), parallel)
    check_load_balance(RunConfig.from_flat(load_balance=False, load_balance_interval=0), parallel)  # off: not checked
    check_load_balance(RunConfig.from_flat(load_balance=True), ParallelSizes(world=4, ep=2, pp=1, moe_dp=2, dp=4))
