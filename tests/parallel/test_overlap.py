"""Expert-parallel options on gloo (fp64): comm_overlap (chunked, pipelined all-to-all) == plain path, and
hierarchical all-to-all == flat, for outputs, router losses and all gradients.

    .venv/bin/python -m pytest tests/parallel/test_overlap.py -q
"""

import pytest
import torch

from openmoe.config import preset
from openmoe.moe import OpenMoeSparseMLP
from openmoe.parallel.overlap import chunk_bounds
from openmoe.router import capacity
from tests.helpers import launch
from tests.parallel.ep_workers import hierarchical_worker, make_inputs, make_layer, overlap_worker

TIGHT = dict(rtol=1e-12, atol=1e-12)


def assert_same_run(got: dict, want: dict, what: str) -> None:
    for key in ("out", "aux", "z", "x_grad", "gate_grad"):
        assert torch.allclose(got[key], want[key], **TIGHT), f"{what}: {key}"
    assert torch.equal(got["counts"], want["counts"]), what
    for name, g in want["expert_grads"].items():
        assert torch.allclose(got["expert_grads"][name], g, **TIGHT), f"{what}: expert grad {name}"


def test_chunk_bounds_cover_any_capacity():
    assert chunk_bounds(8, 3) == [(0, 3), (3, 6), (6, 8)]
    assert chunk_bounds(6, 4) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert chunk_bounds(3, 8) == [(0, 1), (1, 2), (2, 3)]  # more chunks than slots: one slot each
    for c in range(1, 20):
        for n in range(1, 6):
            b = chunk_bounds(c, n)
            assert b[0][0] == 0 and b[-1][1] == c and all(lo < hi for lo, hi in b)
            assert all(b[i][1] == b[i + 1][0] for i in range(len(b) - 1))


def test_overlap_matches_plain(tmp_path):
    world = 2
    # (capacity_factor, chunks): C=6 in 2 even chunks; C=8 in 3 uneven chunks (3, 3, 2); C=6 in 4 (2, 2, 1, 1)
    cases = [(0.75, 2), (1.0, 3), (0.75, 4)]
    tokens = make_inputs(world)[0][0].reshape(-1, 64).shape[0]
    caps = {cf: capacity(tokens, 4, 2, cf, 4) for cf, _ in cases}
    assert caps == {0.75: 6, 1.0: 8}, caps
    assert any(caps[cf] % n for cf, n in cases)  # some capacity is not divisible by its chunk count
    launch(overlap_worker, world, cases, str(tmp_path))
    for r in range(world):
        res = torch.load(tmp_path / f"rank{r}.pt")
        for cf, n in cases:
            plain = res[cf, n]["plain"]
            assert_same_run(res[cf, n]["overlap"], plain, f"rank {r} cf={cf} chunks={n}")
            assert_same_run(res[cf, n]["overlap_recompute"], plain, f"rank {r} cf={cf} chunks={n} checkpointed")
        assert torch.allclose(res["eval"], res["eval_plain"], **TIGHT)


@pytest.mark.parametrize("kwargs, match", [
    (dict(comm_overlap=-1), "number of capacity chunks"),
    (dict(comm_overlap=2, hierarchical=True), "cannot be combined"),
])
def test_option_errors_need_no_process_group(kwargs, match):
    from openmoe.parallel.expert_parallel import _check_options

    with pytest.raises(ValueError, match=match):
        _check_options(make_layer(0.75), kwargs.get("comm_overlap", 0), kwargs.get("hierarchical", False))


def test_dropless_layer_rejects_overlap():
    from openmoe.parallel.expert_parallel import _check_options

    layer = OpenMoeSparseMLP(preset("tiny", num_experts=4, router_capacity_factor_train=0.0))
    with pytest.raises(ValueError, match="dropless"):
        _check_options(layer, 2, False)
    with pytest.raises(ValueError, match="dropless"):
        _check_options(layer, 0, True)


def test_hierarchical_matches_flat(tmp_path):
    world, local = 4, 2  # 2 nodes x 2 ranks
    launch(hierarchical_worker, world, local, 0.75, str(tmp_path))
    for r in range(world):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert res["nodes"] == (2, 2) and res["shared"]
        for got, want in res["primitive"]:
            assert torch.equal(got, want), f"rank {r}: hierarchical all-to-all != all_to_all_single"
        assert_same_run(res["hierarchical"], res["flat"], f"rank {r} hierarchical")


def test_node_split():
    from openmoe.parallel.hierarchical import _split_into_nodes

    assert _split_into_nodes([0, 1, 2, 3], 2) == [[0, 1], [2, 3]]
    assert _split_into_nodes([4, 5, 6, 7], 2) == [[4, 5], [6, 7]]
    assert _split_into_nodes([0, 2, 4, 6], 2) == [[0], [2], [4], [6]]  # one rank per node: the layer uses flat
    with pytest.raises(ValueError, match="equal contiguous runs"):
        _split_into_nodes([0, 1, 2, 4], 4)  # 3 ranks on node 0, 1 on node 1
    with pytest.raises(ValueError, match="equal contiguous runs"):
        _split_into_nodes([0, 2, 1, 3], 2)  # node 0 split in two runs
