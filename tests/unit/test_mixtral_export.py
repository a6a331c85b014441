"""Export of an upcycled llama_moe as HF MixtralForCausalLM: same logits (eager attention, fp32), and clear refusals.

    .venv/bin/python -m pytest tests/unit/test_mixtral_export.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM, MixtralForCausalLM

from openmoe import OpenMoeForCausalLM
from openmoe.convert.__main__ import main as convert_main
from tests.unit.test_upcycle import assert_same_function, ids_batch, logits, tiny_llama


def upcycled(tmp_path, kv_heads=2, extra=()):
    tiny_llama(tmp_path / "dense", num_hidden_layers=3, num_key_value_heads=kv_heads)
    out = tmp_path / "moe"
    assert convert_main(["upcycle", "--dense", str(tmp_path / "dense"), "--num_experts", "4", "--top_k", "2",
                         "--output", str(out), *extra]) == 0
    return out


def diversify(path, seed=0):
    """Make the experts differ and the router decisive, as after training: otherwise any routing gives the same
    output and the test could not see a wrong expert order, router orientation or combine rule."""
    model = OpenMoeForCausalLM.from_pretrained(str(path))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            for p in layer.mlp.experts.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
            layer.mlp.gate_weight.normal_(0.0, 1.0, generator=g)
    model.save_pretrained(str(path))
    return model.eval()


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_mixtral_logits_equal_ours(tmp_path, kv_heads):
    ours = diversify(upcycled(tmp_path, kv_heads))
    assert convert_main(["mixtral", "--moe", str(tmp_path / "moe"), "--output", str(tmp_path / "hf")]) == 0
    raw = json.load(open(tmp_path / "hf" / "config.json"))
    assert raw["architectures"] == ["MixtralForCausalLM"] and raw["num_local_experts"] == 4
    assert (raw["num_experts_per_tok"], raw["num_key_value_heads"], raw["intermediate_size"]) == (2, kv_heads, 128)
    mixtral = MixtralForCausalLM.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager",
                                                 torch_dtype=torch.float32).eval()
    block = mixtral.model.layers[1].block_sparse_moe
    assert torch.equal(block.experts[3].w1.weight, ours.model.layers[1].mlp.experts.wi_gate[3].t())
    assert torch.equal(block.gate.weight, ours.model.layers[1].mlp.gate_weight)

    ids = ids_batch(b=3, s=10)
    want = logits(mixtral, ids)
    assert_same_function(logits(ours, ids), want)
    # the experts now differ, so the routing matters: the dense model is no longer the same function
    dense = LlamaForCausalLM.from_pretrained(str(tmp_path / "dense")).eval()
    assert (logits(dense, ids) - want).abs().max() > 1e-2


def test_mixtral_checkpoint_as_router_source(tmp_path):
    ours = diversify(upcycled(tmp_path))
    convert_main(["mixtral", "--moe", str(tmp_path / "moe"), "--output", str(tmp_path / "hf")])
    assert convert_main(["upcycle", "--dense", str(tmp_path / "dense"), "--num_experts", "4", "--top_k", "2",
                         "--router_init", str(tmp_path / "hf"), "--output", str(tmp_path / "again")]) == 0
    again = OpenMoeForCausalLM.from_pretrained(str(tmp_path / "again"))
    for a, b in zip(again.model.layers, ours.model.layers):
        assert torch.equal(a.mlp.gate_weight, b.mlp.gate_weight)


def test_non_mixtral_models_are_refused_with_every_reason(tmp_path, capsys):
    path = upcycled(tmp_path, extra=["--moe_start_layer", "1", "--router_combine", "prob"])
    assert convert_main(["mixtral", "--moe", str(path), "--output", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "layers [0] are dense (Mixtral has MoE in every layer; MoE layers here: [1, 2])" in err, err
    assert "router_combine 'prob' (Mixtral renormalises the top-k weights: 'normalized')" in err, err

    from openmoe.config import preset

    OpenMoeForCausalLM(preset("tiny", moe_layer_interval=1, num_shared_experts=1)).save_pretrained(
        str(tmp_path / "shared"))
    assert convert_main(["mixtral", "--moe", str(tmp_path / "shared"), "--output", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "model_family 'openmoe' (Mixtral needs 'llama_moe'" in err and "num_shared_experts=1" in err, err
    assert not (tmp_path / "hf").exists()
