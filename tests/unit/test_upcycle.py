"""Sparse upcycling: a tiny dense transformers.LlamaForCausalLM -> `python -m openmoe.convert upcycle` -> our
llama_moe model computes the same logits as the dense HF model (identical experts, renormalised top-k, dropless eval).

    .venv/bin/python -m pytest tests/unit/test_upcycle.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from openmoe import OpenMoeForCausalLM
from openmoe.convert.__main__ import main as convert_main
from openmoe.io.hf import SAFE_INDEX, read_tensors


def tiny_llama(path, seed=0, std=0.1, **overrides) -> LlamaForCausalLM:
    """Random tiny LLaMA saved with save_pretrained into `path`. Weights N(0, std) (embeddings N(0, 1), norms
    around 1) rather than HF's 0.02, so that attention and the SwiGLU are far from linear and a wrong convention
    shows in the logits."""
    kw = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rope_theta=500.0, rms_norm_eps=1e-5,
              attn_implementation="eager")
    kw.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 1.0 if "embed_tokens" in name else std)
    model.save_pretrained(str(path))
    return model


def ids_batch(seed=1, b=2, s=12, vocab=1024):
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids, **kw):
    return model(ids, **kw).logits.float()


def assert_same_function(got, want, rel=1e-6):
    """fp32: max |difference| within rel of the largest |logit| (~1e-5 for these logits of size ~10)."""
    scale = want.abs().max().item()
    assert scale > 1.0  # far from a trivial function
    diff = (got - want).abs().max().item()
    assert diff <= rel * scale, (diff, scale)


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_upcycled_logits_equal_dense_llama(tmp_path, kv_heads):
    dense = tiny_llama(tmp_path / "dense", num_key_value_heads=kv_heads)
    out = tmp_path / "moe"
    assert convert_main(["upcycle", "--dense", str(tmp_path / "dense"), "--num_experts", "8", "--top_k", "2",
                         "--moe_start_layer", "1", "--moe_layer_interval", "2", "--max_shard_size", "300KB",
                         "--output", str(out)]) == 0
    index = json.load(open(out / SAFE_INDEX))
    assert len(set(index["weight_map"].values())) > 2  # streamed into several shards
    ours = OpenMoeForCausalLM.from_pretrained(str(out)).eval()
    cfg = ours.config
    assert (cfg.model_family, cfg.router_combine, cfg.num_key_value_heads) == ("llama_moe", "normalized", kv_heads)
    assert [layer.is_moe for layer in ours.model.layers] == [False, True, False, True]
    assert (cfg.label_smoothing, cfg.z_loss_factor, cfg.router_capacity_factor_eval) == (0.0, 0.0, 0.0)

    sd = read_tensors(str(out))
    ffn = dense.model.layers[3].mlp
    for e in range(8):  # every expert is the dense FFN, transposed into the x @ W layout
        assert torch.equal(sd["model.layers.3.mlp.experts.wi_gate"][e], ffn.gate_proj.weight.t())
        assert torch.equal(sd["model.layers.3.mlp.experts.wi_up"][e], ffn.up_proj.weight.t())
        assert torch.equal(sd["model.layers.3.mlp.experts.wo"][e], ffn.down_proj.weight.t())
    assert sd["model.layers.1.mlp.gate_weight"].shape == (8, 64)
    assert 0.01 < sd["model.layers.1.mlp.gate_weight"].std() < 0.03  # N(0, initializer_range = 0.02)
    assert torch.equal(sd["model.layers.2.mlp.gate_proj.weight"], dense.model.layers[2].mlp.gate_proj.weight)

    ids = ids_batch()
    want = logits(dense, ids)
    for impl in ("sdpa", "eager"):
        ours.apply_options(ours.options.replace(attn_impl=impl))
        assert_same_function(logits(ours, ids), want)
    # the router really routes (different tokens, different top-2), yet identical experts make it invisible
    mlp = ours.model.layers[1].mlp
    r = mlp.route(torch.randn(64, 64), None)
    assert r.expert_idx.unique().numel() == 8 and torch.allclose(r.combine_weight.sum(-1), torch.ones(64))


def test_left_padding_matches_hf_with_explicit_positions(tmp_path):
    """llama_moe has no <pad>-as-BOS exception: a padded row equals HF given the same positions and mask."""
    dense = tiny_llama(tmp_path / "dense")
    convert_main(["upcycle", "--dense", str(tmp_path / "dense"), "--num_experts", "4", "--top_k", "2",
                  "--output", str(tmp_path / "moe")])
    ours = OpenMoeForCausalLM.from_pretrained(str(tmp_path / "moe")).eval()
    ids = ids_batch(b=2, s=10)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding of 3 (column 0 padding, column 1 real: the OpenMoE BOS rule would unmask it)
    mask[0, 0] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    want = logits(dense, ids, attention_mask=mask, position_ids=positions)
    got = logits(ours, ids, attention_mask=mask)
    real = mask.bool()
    assert_same_function(got[real], want[real])


def test_tied_llama_is_untied_and_router_copied_from_another_moe(tmp_path, capsys):
    dense = tiny_llama(tmp_path / "dense", tie_word_embeddings=True, num_hidden_layers=3)
    assert json.load(open(tmp_path / "dense" / "config.json"))["tie_word_embeddings"] is True
    base = ["upcycle", "--dense", str(tmp_path / "dense"), "--num_experts", "4", "--top_k", "2"]
    assert convert_main(base + ["--seed", "7", "--output", str(tmp_path / "a")]) == 0
    assert "lm_head gets a copy of embed_tokens" in capsys.readouterr().out
    a = OpenMoeForCausalLM.from_pretrained(str(tmp_path / "a")).eval()
    assert torch.equal(a.lm_head.weight, dense.model.embed_tokens.weight)
    ids = ids_batch()
    assert_same_function(logits(a, ids), logits(dense, ids))

    assert convert_main(base + ["--router_init", str(tmp_path / "a"), "--output", str(tmp_path / "b")]) == 0
    b = OpenMoeForCausalLM.from_pretrained(str(tmp_path / "b"))
    for i in range(3):
        assert torch.equal(b.model.layers[i].mlp.gate_weight, a.model.layers[i].mlp.gate_weight)
    assert convert_main(base + ["--output", str(tmp_path / "c")]) == 0  # default seed: a different random router
    c = OpenMoeForCausalLM.from_pretrained(str(tmp_path / "c"))
    assert not torch.equal(c.model.layers[0].mlp.gate_weight, a.model.layers[0].mlp.gate_weight)

    # a source without routers for some layers, or with another expert count, is refused with the numbers
    sparse = ["--moe_start_layer", "1", "--moe_layer_interval", "2", "--output", str(tmp_path / "d")]
    assert convert_main(base + sparse) == 0
    assert convert_main(base + ["--router_init", str(tmp_path / "d"), "--output", str(tmp_path / "e")]) == 2
    assert "no router for MoE layer(s) [0, 2]" in capsys.readouterr().err
    assert convert_main(["upcycle", "--dense", str(tmp_path / "dense"), "--num_experts", "8", "--top_k", "2",
                         "--router_init", str(tmp_path / "a"), "--output", str(tmp_path / "e")]) == 2
    assert "want [num_experts=8, hidden_size=64]: layer 0: (4, 64)" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_unsupported_llama_features_are_refused(tmp_path, capsys):
    tiny_llama(tmp_path / "dense", num_hidden_layers=2)
    raw = json.load(open(tmp_path / "dense" / "config.json"))
    raw.update(rope_scaling={"rope_type": "linear", "factor": 2.0}, mlp_bias=True)
    (tmp_path / "dense" / "config.json").write_text(json.dumps(raw))
    args = ["upcycle", "--dense", str(tmp_path / "dense"), "--num_experts", "4", "--top_k", "2",
            "--output", str(tmp_path / "out")]
    assert convert_main(args) == 2
    err = capsys.readouterr().err
    assert "rope_scaling {'rope_type': 'linear', 'factor': 2.0} (accepted: null" in err, err
    assert "mlp_bias=True (accepted: false)" in err, err
    raw.update(rope_scaling=None, mlp_bias=False, model_type="mistral")
    (tmp_path / "dense" / "config.json").write_text(json.dumps(raw))
    assert convert_main(args) == 2
    assert "model_type 'mistral'; accepted: 'llama'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
