"""The llama_moe family and the MoE switches shared with OpenMoE: config, placement, combine rules, the sequence-level
aux loss, LLaMA-style experts (reference loop, grouped GEMM, 2-rank expert parallel), shared experts, GQA decoding,
and trainable-parameter selection. (Equivalence with HF LLaMA / Mixtral: test_upcycle.py, test_mixtral_export.py.)

    .venv/bin/python -m pytest tests/unit/test_llama_variant.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from openmoe import OpenMoeConfig, OpenMoeForCausalLM, preset
from openmoe.config import PRESETS
from openmoe.finetune import trainable_parameters
from openmoe.losses import router_aux_loss, router_aux_loss_seq
from openmoe.moe import LlamaExperts, OpenMoeExperts, OpenMoeSparseMLP, reference_moe_forward
from openmoe.router import route

LLAMA = dict(model_family="llama_moe", vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, moe_layer_interval=1,
             moe_start_layer=0, router_combine="normalized", label_smoothing=0.0, z_loss_factor=0.0)


def llama_config(**overrides) -> OpenMoeConfig:
    return OpenMoeConfig(**{**LLAMA, **overrides})


# --- config ---
def test_new_fields_round_trip_and_openmoe_defaults(tmp_path):
    cfg = llama_config(moe_start_layer=1, moe_layer_interval=2, moe_intermediate_size=12, num_shared_experts=2,
                       router_combine="ones", router_aux_loss_type="seq", rope_theta=5e5)
    cfg.save(str(tmp_path))
    raw = json.load(open(tmp_path / "config.json"))
    assert (raw["model_family"], raw["hidden_act"], raw["num_key_value_heads"]) == ("llama_moe", "silu", 2)
    assert (raw["moe_start_layer"], raw["moe_intermediate_size"], raw["num_shared_experts"]) == (1, 12, 2)
    assert (raw["router_combine"], raw["router_aux_loss_type"]) == ("ones", "seq")
    assert OpenMoeConfig.load(str(tmp_path)) == cfg
    # a published OpenMoE config.json (none of the new keys) reads as the openmoe family with every switch off
    old = OpenMoeConfig.from_dict(dict(PRESETS["8b"], hidden_act="swiglu"))
    assert (old.model_family, old.moe_start_layer, old.moe_intermediate_size, old.num_shared_experts) == (
        "openmoe", None, None, 0)
    assert (old.router_combine, old.router_aux_loss_type, old.attention_scale, old.extra_mlp) == (
        "prob", "switch", 1.0, True)
    assert old == preset("8b")


def test_moe_placement_rule():
    for interval in range(1, 7):  # OpenMoE's rule is kept exactly when moe_start_layer is None
        cfg = preset("tiny", num_hidden_layers=24, moe_layer_interval=interval)
        assert [cfg.is_moe_layer(i) for i in range(24)] == [(i + 1) % interval == 0 for i in range(24)]
    cfg = llama_config(num_hidden_layers=32, moe_start_layer=16, moe_layer_interval=2)
    assert [i for i in range(32) if cfg.is_moe_layer(i)] == [16, 18, 20, 22, 24, 26, 28, 30]
    cfg = llama_config(moe_start_layer=1, moe_layer_interval=2)
    with torch.device("meta"):
        keys = OpenMoeForCausalLM(cfg, init=False).state_dict()
    assert {k.split(".")[2] for k in keys if "gate_weight" in k} == {"1", "3"}
    assert "model.layers.0.mlp.gate_proj.weight" in keys and not any("extra_mlp" in k for k in keys)
    assert keys["model.layers.0.self_attn.k_proj.weight"].shape == (16, 32)  # 2 KV heads x head_dim 8
    assert keys["model.layers.1.mlp.experts.wi_gate"].shape == (4, 32, 48)  # I-wide gate (not 2I)


@pytest.mark.parametrize("overrides,message", [
    (dict(num_key_value_heads=3), r"num_key_value_heads \(3\) must divide num_attention_heads \(4\)"),
    (dict(hidden_act="swiglu"), r"hidden_act 'swiglu' is not supported by model_family 'llama_moe'; accepted: 'silu'"),
    (dict(moe_start_layer=4), r"moe_start_layer \(4\) must be in \[0, num_hidden_layers=4\)"),
    (dict(router_combine="softmax"), r"router_combine 'softmax' is not supported; accepted: \['prob', 'normalized'"),
    (dict(router_aux_loss_type="batch"), r"router_aux_loss_type 'batch' is not supported; accepted: \['switch', 'seq'"),
    (dict(model_family="llama"), r"model_family 'llama' is not supported; accepted: \['llama_moe', 'openmoe'\]"),
    (dict(num_shared_experts=-1), r"num_shared_experts \(-1\) must be >= 0"),
    (dict(tie_word_embeddings=True), r"tie_word_embeddings=True is not supported"),
])
def test_invalid_configs_name_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        llama_config(**overrides)


def test_rope_equals_hf_llama_rotary_embedding():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from openmoe.model import apply_rope, rope_cos_sin

    hf_cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, rope_theta=5e5, rope_scaling=None,
                         max_position_embeddings=4096)
    positions = torch.tensor([[0, 1, 2, 3000], [7, 7, 100, 4095]])
    q, k = torch.randn(2, 4, 4, 16), torch.randn(2, 4, 4, 16)  # [B, N, S, D]
    cos_hf, sin_hf = LlamaRotaryEmbedding(hf_cfg)(q, positions)
    cos, sin = rope_cos_sin(positions, 16, 5e5, torch.float32)
    assert torch.equal(cos, cos_hf) and torch.equal(sin, sin_hf)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    assert torch.equal(apply_rope(q, cos, sin), q_hf) and torch.equal(apply_rope(k, cos, sin), k_hf)


# --- routing and losses ---
def test_router_combine_modes_hand_values():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.0]])
    p = logits.softmax(-1)
    args = (logits, torch.eye(4), 2, 0.0, 1)
    prob = route(*args).combine_weight
    assert torch.allclose(prob, torch.stack([p[0, [0, 1]], p[1, [1, 2]]]))
    norm = route(*args, combine="normalized").combine_weight
    assert torch.allclose(norm[0], p[0, [0, 1]] / (p[0, 0] + p[0, 1]))
    assert torch.allclose(norm.sum(-1), torch.ones(2))
    ones = route(*args, combine="ones", token_mask=torch.tensor([True, False])).combine_weight
    assert ones.tolist() == [[1.0, 1.0], [0.0, 0.0]]  # masked (or dropped) choices weigh 0 in every mode


def test_sequence_level_aux_loss_hand_formula():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.1, 0.4],  # sequence 0
                          [0.2, 0.3, 0.5], [0.3, 0.3, 0.4], [0.6, 0.2, 0.2]])  # sequence 1 (last token padding)
    idx = torch.tensor([[0, 1], [1, 2], [0, 2], [2, 1], [2, 0], [0, 1]])
    mask = torch.tensor([True, True, True, True, True, False])
    k = 2
    # sequence 0, T=3: counts e0:2 e1:2 e2:2 -> f = E/(K T) * counts = 3/6 * [2, 2, 2]; P = column means
    f0, p0 = torch.tensor([1.0, 1.0, 1.0]), probs[:3].mean(0)
    # sequence 1, T=2: counts e0:1 e1:1 e2:2 -> f = 3/4 * [1, 1, 2]
    f1, p1 = torch.tensor([0.75, 0.75, 1.5]), probs[3:5].mean(0)
    want = ((f0 * p0).sum() + (f1 * p1).sum()) / 2
    assert router_aux_loss_seq(probs, idx, mask, seq_len=3).item() == pytest.approx(want.item(), rel=1e-6)
    # uniform routing gives 1 (the batch-level Switch form gives K), and one sequence equals the batch form / K
    uniform = torch.full((6, 3), 1 / 3)
    idx_u = torch.tensor([[0, 1], [1, 2], [2, 0]] * 2)
    assert router_aux_loss_seq(uniform, idx_u, torch.ones(6, dtype=torch.bool), 3).item() == pytest.approx(1.0)
    whole = router_aux_loss_seq(probs, idx, mask, seq_len=6).item()
    assert whole == pytest.approx(router_aux_loss(probs, idx, mask).item() / k)
    # an all-padding sequence is skipped, not counted as zero
    pad = torch.tensor([True, True, True, False, False, False])
    assert router_aux_loss_seq(probs, idx, pad, 3).item() == pytest.approx((f0 * p0).sum().item())


def test_seq_aux_loss_through_the_model_layer():
    cfg = llama_config(router_aux_loss_type="seq")
    layer = OpenMoeSparseMLP(cfg)
    torch.nn.init.normal_(layer.gate_weight)
    for p in layer.experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(3, 5, 32)
    _, aux = layer(x)
    r = layer.route(x.reshape(-1, 32), None)
    assert aux.aux_loss.item() == pytest.approx(router_aux_loss_seq(r.probs, r.expert_idx, r.token_mask, 5).item())


# --- experts ---
def llama_layer(seed=0, **overrides):
    torch.manual_seed(seed)
    layer = OpenMoeSparseMLP(llama_config(**overrides)).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


@pytest.mark.parametrize("cf", [0.5, 0.0])
def test_llama_experts_equal_reference_loop_and_hand_swiglu(cf):
    layer = llama_layer()
    assert type(layer.experts) is LlamaExperts and layer.experts.wi_gate.shape == (4, 32, 48)
    layer.capacity_factor_train = cf
    x = torch.randn(3, 7, 32, dtype=torch.float64, requires_grad=True)
    out, aux = layer(x)
    ref, r = reference_moe_forward(layer, x)
    assert torch.allclose(out, ref, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [x, *layer.parameters()], g),
                    torch.autograd.grad(ref, [x, *layer.parameters()], g)):
        assert torch.allclose(a, b, atol=1e-10)
    # expert 2 by hand: HF LlamaMLP with gate_proj = wi_gate[2].T etc.
    ex = layer.experts
    t = x[0, :3].detach()
    want = (F.silu(t @ ex.wi_gate[2]) * (t @ ex.wi_up[2])) @ ex.wo[2]
    assert torch.allclose(ex.forward_one(2, t), want)
    if cf == 0.5:
        assert aux.dropped_fraction > 0.1


def test_llama_experts_grouped_gemm_equals_bmm():
    layer = llama_layer().float()
    x = torch.randn(2, 9, 32, requires_grad=True)
    g = torch.randn(2, 9, 32)
    results = []
    for impl in ("bmm", "grouped"):
        layer.expert_impl = impl
        out, _ = layer(x)
        results.append((out, *torch.autograd.grad(out, [x, *layer.parameters()], g)))
    for u, v in zip(*results):
        assert ((u - v).norm() / v.norm()).item() < 1e-5


def test_shared_experts_add_an_always_on_dense_mlp():
    torch.manual_seed(0)
    cfg = llama_config(num_shared_experts=2, moe_intermediate_size=8, moe_start_layer=1, moe_layer_interval=2)
    model = OpenMoeForCausalLM(cfg).eval()
    layer = model.model.layers[1]
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.2)
    assert layer.shared_experts.gate_proj.weight.shape == (16, 32)  # 2 x moe_intermediate_size, I-wide gate
    assert not hasattr(model.model.layers[0], "shared_experts")  # dense layers have none
    h = torch.randn(2, 5, 32)
    cos, sin = torch.ones(2, 5, 8), torch.zeros(2, 5, 8)  # position 0 everywhere: no rotation
    out, aux = layer(h, cos, sin, None, None)
    a = layer.self_attn(layer.input_layernorm(h), cos, sin, None)
    n = layer.post_attention_layernorm(h + a)
    moe, _ = layer.mlp(n)
    shared = layer.shared_experts.down_proj(F.silu(layer.shared_experts.gate_proj(n)) * layer.shared_experts.up_proj(n))
    assert torch.allclose(out, h + a + moe + shared, atol=1e-6)
    assert aux is not None and shared.abs().max() > 0.1


def test_gqa_kv_cache_decoding_equals_full_forward():
    torch.manual_seed(0)
    model = OpenMoeForCausalLM(llama_config(router_capacity_factor_eval=0.0)).eval()
    ids = torch.randint(0, 256, (2, 9))
    full = model(ids).logits
    out = model(ids[:, :5], use_cache=True)
    assert out.past_key_values[0][0].shape == (2, 2, 5, 8)  # the cache holds the 2 KV heads, not 4 repeats
    past = out.past_key_values
    for t in range(5, 9):
        step = model(ids[:, t:t + 1], past_key_values=past, use_cache=True)
        past = step.past_key_values
        assert torch.allclose(step.logits[:, -1], full[:, t], atol=1e-5)
    model.apply_options(model.options.replace(attn_impl="eager"))
    assert torch.allclose(model(ids).logits, full, atol=1e-5)


# --- expert parallel ---
def ep_llama_worker(rank, world, out_path):
    import torch.distributed as dist

    from openmoe.parallel.expert_parallel import ExpertParallelMoE
    from tests.parallel.ep_workers import run_ep

    results = {}
    for cf in (0.75, 0.0):  # capacity with drops, dropless
        ep = ExpertParallelMoE(_ep_layer(cf), dist.group.WORLD)
        results[cf] = run_ep(ep, rank, world)
    torch.save(results, f"{out_path}/rank{rank}.pt")


def _ep_layer(cf):
    layer = llama_layer(num_experts=4, router_aux_loss_type="seq", hidden_size=64, intermediate_size=16)
    layer.capacity_factor_train = cf
    return layer


def test_expert_parallel_llama_layer_matches_single_device(tmp_path):
    """2 gloo ranks: outputs, seq aux loss, input/router/expert gradients equal the single-device layer run on each
    rank's tokens (capacity is per rank, as in tests/parallel/test_expert_parallel.py)."""
    from openmoe.parallel.expert_parallel import ExpertParallelMoE
    from tests.helpers import launch
    from tests.parallel.ep_workers import make_inputs

    launch(ep_llama_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x, mask, grad = make_inputs(2)
    for cf in (0.75, 0.0):
        ref = _ep_layer(cf)
        xs = x.clone().requires_grad_(True)
        loss, drops = 0.0, 0.0
        for r in range(2):
            out, aux = ref(xs[r], mask[r])
            drops += float(aux.dropped_fraction)
            assert torch.allclose(ranks[r][cf]["out"], out, atol=1e-12)
            assert torch.allclose(ranks[r][cf]["aux"], aux.aux_loss, atol=1e-12)
            loss = loss + (out * grad[r]).sum() + aux.aux_loss + aux.z_loss
        assert (drops > 0.1) == (cf > 0)  # the capacity case really drops choices
        loss.backward()
        for r in range(2):
            assert torch.allclose(ranks[r][cf]["x_grad"], xs.grad[r], atol=1e-12)
            lo, hi = ranks[r][cf]["slice"]
            for name, g in ranks[r][cf]["expert_grads"].items():
                assert torch.allclose(g, getattr(ref.experts, name).grad[lo:hi] / 2, atol=1e-12), name
        assert torch.allclose(sum(rk[cf]["gate_grad"] for rk in ranks), ref.gate_weight.grad, atol=1e-12)
    # the overlapped pipeline's hand-written backward is OpenMoE's double-gated SwiGLU: refused for LLaMA experts
    with pytest.raises(ValueError, match="OpenMoeExperts .SwiGLU., got LlamaExperts"):
        ExpertParallelMoE(_ep_layer(0.75), None, comm_overlap=2)
    assert type(OpenMoeSparseMLP(preset("tiny")).experts) is OpenMoeExperts


# --- fine-tuning selection ---
def test_trainable_parameters_modes():
    model = OpenMoeForCausalLM(llama_config(num_shared_experts=1, moe_start_layer=1, moe_layer_interval=2))
    names = [n for n, _ in model.named_parameters()]
    routers = {n for n in names if n.endswith("gate_weight")}
    experts = {n for n in names if ".mlp.experts." in n or ".shared_experts." in n}
    others = set(names) - routers - experts
    assert len(routers) == 2 and len(experts) == 2 * 3 + 2 * 3 and "model.layers.0.mlp.gate_proj.weight" in others

    def check(mode, freeze, want):
        got = set(trainable_parameters(model, mode, freeze))
        assert got == want, mode
        assert {n for n, p in model.named_parameters() if p.requires_grad} == want

    check("all", False, set(names))
    check("all", True, set(names) - routers)
    check("router", False, routers)
    check("experts", False, experts | routers)
    check("experts", True, experts)
    check("non_expert", False, others | routers)
    check("non_expert", True, others)
    with pytest.raises(ValueError, match="leaves nothing to train"):
        trainable_parameters(model, "router", True)
    with pytest.raises(ValueError, match=r"trainable mode 'moe' is not supported; accepted: \['all', 'router'"):
        trainable_parameters(model, "moe")
