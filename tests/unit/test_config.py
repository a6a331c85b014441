import json

import pytest
import torch

from openmoe.config import PRESETS, OpenMoeConfig, preset
from openmoe.model import OpenMoeForCausalLM


def published_table(cfg: OpenMoeConfig) -> dict[str, tuple]:
    """Every key and shape of the published PyTorch checkpoints (issue #2's table)."""
    h, i, e, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.vocab_size
    inner = cfg.num_attention_heads * cfg.head_dim
    dense = {"gate_proj.weight": (2 * i, h), "up_proj.weight": (i, h), "down_proj.weight": (h, i)}
    t = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        t[p + "input_layernorm.weight"] = (h,)
        t[p + "post_attention_layernorm.weight"] = (h,)
        for proj in "qkv":
            t[p + f"self_attn.{proj}_proj.weight"] = (inner, h)
        t[p + "self_attn.o_proj.weight"] = (h, inner)
        if (n + 1) % cfg.moe_layer_interval == 0:
            t[p + "mlp.gate_weight"] = (e, h)
            t[p + "mlp.experts.wi_gate"] = (e, h, 2 * i)
            t[p + "mlp.experts.wi_up"] = (e, h, i)
            t[p + "mlp.experts.wo"] = (e, i, h)
            t[p + "pre_extra_mlp_layernorm.weight"] = (h,)
            t.update({p + "extra_mlp." + k: s for k, s in dense.items()})
        else:
            t.update({p + "mlp." + k: s for k, s in dense.items()})
    return t


@pytest.mark.parametrize("name", ["base", "8b"])
def test_state_dict_keys_and_shapes_match_published_checkpoints(name):
    cfg = preset(name)
    with torch.device("meta"):
        model = OpenMoeForCausalLM(cfg, init=False)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == published_table(cfg)


def test_8b_spot_shapes_from_issue():
    t = published_table(preset("8b"))
    assert t["model.embed_tokens.weight"] == (256384, 2048)
    assert t["model.layers.0.self_attn.q_proj.weight"] == (3072, 2048)
    assert t["model.layers.0.mlp.gate_proj.weight"] == (16384, 2048)
    assert t["model.layers.5.mlp.experts.wi_gate"] == (32, 2048, 16384)
    assert t["model.layers.5.mlp.experts.wo"] == (32, 8192, 2048)
    moe_layers = sorted({int(k.split(".")[2]) for k in t if "experts" in k})
    assert moe_layers == [5, 11, 17, 23]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_json_round_trip(name, tmp_path):
    cfg = preset(name)
    path = cfg.save(str(tmp_path))
    raw = json.load(open(path))
    assert raw["model_type"] == "openmoe" and raw["router_topk"] == cfg.router_topk  # issue 16: our own type
    assert OpenMoeConfig.load(str(tmp_path)) == cfg


def test_reads_old_example_spelling():
    raw = dict(PRESETS["base"], topk=1, capacity_factor_train=1.0, capacity_factor_eval=3.0, min_capacity=8,
               layer_norm_epsilon=1e-5, gated=True, some_unknown_key=3)
    cfg = OpenMoeConfig.from_dict(raw)
    assert (cfg.router_topk, cfg.router_capacity_factor_train, cfg.router_capacity_factor_eval) == (1, 1.0, 3.0)
    assert (cfg.router_min_capacity, cfg.rms_norm_eps) == (8, 1e-5)
    assert cfg.to_dict()["some_unknown_key"] == 3 and "topk" not in cfg.to_dict()


def test_hub_defaults():
    cfg = preset("8b")
    assert (cfg.router_topk, cfg.router_capacity_factor_train, cfg.router_capacity_factor_eval) == (2, 1.25, 2.0)
    assert (cfg.router_min_capacity, cfg.router_aux_loss_factor, cfg.router_z_loss_factor) == (4, 0.01, 0.0001)
    assert (cfg.z_loss_factor, cfg.label_smoothing, cfg.rms_norm_eps) == (0.01, 0.001, 1e-6)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (0, 1, 0)


def test_unknown_preset_error():
    with pytest.raises(ValueError, match=r"unknown OpenMoE preset 'huge'; accepted: \['34b', '8b', 'base', 'tiny'\]"):
        preset("huge")


def test_missing_field_error(tmp_path):
    raw = dict(PRESETS["tiny"])
    del raw["num_experts"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"missing required field\(s\) \['num_experts'\]"):
        OpenMoeConfig.load(str(tmp_path))


def test_gqa_rejected():
    with pytest.raises(ValueError, match=r"num_key_value_heads \(2\) must equal num_attention_heads \(4\)"):
        preset("tiny", num_key_value_heads=2)
