"""MoEfication of a tiny dense LLaMA on the shipped tokenizer and sample data.

    .venv/bin/python -m pytest tests/unit/test_moefy.py -q

  * every neuron lands in exactly one expert, all experts the same size;
  * top_k = num_experts with combine weight 1 ("ones"): the MoE model is the dense model (logits, and each MoE FFN);
  * top-2 of 8: the held-out reconstruction error of the co-activation (balanced k-means) split with its trained
    router is below that of a random split with its trained router.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from openmoe import OpenMoeForCausalLM
from openmoe.convert.__main__ import main as convert_main
from openmoe.convert.moefy import balanced_assign, balanced_kmeans, moefy
from openmoe.io.hf import read_tensors
from tests.unit.test_upcycle import assert_same_function, ids_batch, logits, tiny_llama

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = str(ROOT / "tests" / "assets" / "tokenizer")
DATA = str(ROOT / "data" / "sample" / "train.jsonl")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Hundreds of tiny router-training steps: on a shared 2-core machine, intra-op threads only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense")
    # vocab 1024 >= the shipped tokenizer's 768; I = 256 neurons per FFN
    model = tiny_llama(path, std=0.15, num_hidden_layers=2, intermediate_size=256)
    return path, model


def test_balanced_assignment_and_kmeans_sizes():
    sim = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.6], [0.1, 0.0]])
    # everyone prefers cluster 0, which takes its two most similar proposers; the rest go to cluster 1
    assert balanced_assign(sim, 2).tolist() == [0, 0, 1, 1]
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 5
    points = centres.repeat_interleave(6, 0) + torch.randn(24, 16, generator=g)  # 4 clear clusters of 6
    assign = balanced_kmeans(points, 4)
    assert torch.bincount(assign, minlength=4).tolist() == [6, 6, 6, 6]
    for c in range(4):  # each true cluster is one k-means cluster
        assert assign[6 * c: 6 * c + 6].unique().numel() == 1


def test_all_experts_selected_reproduces_the_dense_model(dense, tmp_path, capsys):
    path, model = dense
    out = tmp_path / "moe"
    assert convert_main(["moefy", "--dense", str(path), "--num_experts", "4", "--top_k", "4", "--data", DATA,
                         "--tokenizer", TOKENIZER, "--seq_len", "64", "--max_tokens", "2048", "--router_steps", "5",
                         "--output", str(out)]) == 0
    assert "held-out relative error 0.0000" in capsys.readouterr().out
    ours = OpenMoeForCausalLM.from_pretrained(str(out)).eval()
    cfg = ours.config
    assert (cfg.router_combine, cfg.moe_intermediate_size, cfg.intermediate_size) == ("ones", 64, 256)
    sd = read_tensors(str(out))
    w = model.model.layers[1].mlp.gate_proj.weight  # [I, H]
    stacked = sd["model.layers.1.mlp.experts.wi_gate"]  # [E, H, I / E]
    rows = torch.cat([stacked[e].t() for e in range(4)])  # every neuron exactly once, unchanged
    order = torch.cdist(rows, w).argmin(1)
    assert sorted(order.tolist()) == list(range(256)) and torch.equal(rows, w[order])

    x = torch.randn(2, 7, 64)
    for i in range(2):
        moe_out, _ = ours.model.layers[i].mlp(x)
        dense_out = model.model.layers[i].mlp(x)
        assert (moe_out - dense_out).abs().max() <= 1e-6 * dense_out.abs().max()
    ids = ids_batch(s=16)
    assert_same_function(logits(ours, ids), logits(model, ids))


def test_clustered_split_reconstructs_better_than_random(dense, tmp_path):
    path, _ = dense
    kw = dict(num_experts=8, top_k=2, data=DATA, tokenizer=TOKENIZER, seq_len=64, max_tokens=8192)
    clustered = moefy(str(path), str(tmp_path / "kmeans"), split="balanced_kmeans", **kw)
    random = moefy(str(path), str(tmp_path / "random"), split="random", **kw)
    for report in (clustered, random):
        for layer in report["layers"].values():
            # a trained router: worse than the oracle top-2, far better than chance (2 of 8 = 25% agreement)
            assert layer["oracle_error"] < layer["heldout_error"] < 1.0
            assert layer["router_accuracy"] > 0.45
    # measured: 0.656 (clustered) vs 0.757 (random) mean relative error on 832 held-out tokens
    assert clustered["mean_heldout_error"] < random["mean_heldout_error"] - 0.03
    for i in (0, 1):
        assert clustered["layers"][i]["heldout_error"] < random["layers"][i]["heldout_error"]
    moe = OpenMoeForCausalLM.from_pretrained(str(tmp_path / "kmeans"))
    assert moe.config.router_topk == 2 and moe.model.layers[0].mlp.experts.wi_up.shape == (8, 64, 32)
