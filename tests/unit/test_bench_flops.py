"""The benchmark's FLOP accounting (benchmark/flops.py) against hand counts of the tiny OpenMoE and Mixtral shapes.

    .venv/bin/python -m pytest tests/unit/test_bench_flops.py -q
"""

import pytest
import torch

from benchmark import flops as F
from benchmark.naive_moe import naive_model_
from openmoe import OpenMoeForCausalLM, preset

# tiny preset: V 1024, H 64, I 128, 4 layers, 4 heads x 16, E 4, top-2, MoE layers 1 and 3 (interval 2)
V, H, I, L, A, E, K, S = 1024, 64, 128, 4, 4 * 16, 4, 2, 64


def hand_openmoe_flops_per_token() -> int:
    attention = 4 * H * A  # q, k, v, o
    dense_mlp = (2 * I) * H + I * H + I * H  # double-gated: gate 2I wide, up, down
    expert = (2 * I) * H + I * H + I * H
    router = E * H
    lm_head = V * H
    dense = L * attention + 2 * dense_mlp + 2 * (router + dense_mlp) + lm_head  # 2 dense layers; 2 MoE (+ extra MLP)
    activated = dense + 2 * E * expert * K // E
    return 6 * activated + 6 * L * S * A


def hand_mixtral_flops_per_token() -> int:
    per_layer = 4 * H * A + E * H  # attention + router; every layer MoE
    expert = 3 * H * I  # w1, w3, w2
    activated = L * per_layer + V * H + L * E * expert * K // E
    return 6 * activated + 6 * L * S * A


def test_openmoe_tiny_matches_the_hand_count():
    model = OpenMoeForCausalLM(preset("tiny"))
    c = F.openmoe_flops(model, S)
    assert c.flops_per_token == hand_openmoe_flops_per_token() == 2460672
    assert c.embedding_params == V * H and c.attention_flops_per_token == 6 * L * S * A
    assert c.vector_params == sum(p.numel() for p in model.parameters() if p.dim() == 1)  # norms, not counted


def test_naive_baseline_counts_the_same_model_flops():
    model = OpenMoeForCausalLM(preset("tiny"))
    before = F.openmoe_flops(model, S)
    assert F.openmoe_flops(naive_model_(model), S) == before


def test_mixtral_tiny_matches_the_hand_count():
    pytest.importorskip("transformers")
    from transformers import MixtralForCausalLM

    from benchmark.train_bench import mixtral_config

    model = MixtralForCausalLM(mixtral_config(preset("tiny", moe_layer_interval=1)))
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (A, H)
    assert F.mixtral_flops(model, S).flops_per_token == hand_mixtral_flops_per_token() == 2070528


def test_mfu_and_a_wrong_expert_split_is_refused():
    assert F.mfu(98.9e12) == pytest.approx(0.1)
    bad = F.FlopCount(10, 7, 0, 0, top_k=2, num_experts=4, num_layers=1, attention_width=1, seq_len=1)
    with pytest.raises(ValueError, match="not a multiple of num_experts"):
        bad.activated_params


def test_8b_two_layer_shape_numbers_used_in_the_docs():
    with torch.device("meta"):
        model = OpenMoeForCausalLM(preset("8b", num_hidden_layers=2, moe_layer_interval=1), init=False)
    c = F.openmoe_flops(model, 2048)
    total = sum(p.numel() for p in model.parameters())
    assert 5.5e9 < total < 5.6e9  # ~124 GiB at ZeRO-1's 24 bytes/parameter optimizer-step peak on one GPU
    assert 0.97e9 < c.activated_params < 0.99e9 and 5.9e9 < c.flops_per_token < 6.0e9


def test_every_gpu_configuration_parses_and_its_layout_is_valid():
    """The GPU table must not fail on an argument or size error at the first try (device time is scarce)."""
    from benchmark import moe_layer_bench, train_bench
    from benchmark.run_train_bench import GPU_CONFIGS, select

    for c in GPU_CONFIGS:
        if c.kind == "micro":
            moe_layer_bench.parse_args(list(c.args))
            continue
        a = train_bench.parse_args(["--kind", c.kind, "--name", c.name, *c.args])
        cfg = train_bench.model_config(a)
        assert cfg.num_moe_layers >= 1 and a.seq == 2048, c.name
        if c.kind == "ours":
            _, sizes = train_bench.ours_layout(a, cfg, c.nproc)
            assert sizes.dp * a.batch_size * a.seq // c.nproc >= 8192, c.name  # >= 4 x 2048 tokens per GPU and step
        elif c.kind == "mixtral":
            train_bench.mixtral_config(cfg)
    assert {c.nproc for c in select(GPU_CONFIGS, "1gpu")} == {1}
    assert {c.nproc for c in select(GPU_CONFIGS, "2gpu")} == {2}
    # each half inside one 10-minute command at the driver's default budget (540 s)
    assert sum(c.est_s for c in select(GPU_CONFIGS, "1gpu")) < 460 > sum(c.est_s for c in select(GPU_CONFIGS, "2gpu"))
