"""Fast paths beside their references: selective activation checkpointing == no checkpointing (values and grads),
and it really keeps the matmul outputs (no forward matmul runs again in backward)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from openmoe.config import ModelOptions, preset
from openmoe.model import OpenMoeForCausalLM, RMSNorm


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default):
            self.n += 1
        return func(*args, **(kwargs or {}))


def run(model, ids, policy):
    model.zero_grad()
    model.apply_options(ModelOptions(activation_checkpointing=policy is not None, ac_policy=policy or "full"))
    out = model(ids, labels=ids)
    with CountMatmuls() as counter:
        out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in model.parameters()], counter.n


def test_selective_checkpointing_equals_plain_and_recomputes_no_matmul():
    torch.manual_seed(0)
    model = OpenMoeForCausalLM(preset("tiny")).double().train()
    ids = torch.randint(3, 700, (2, 12))
    plain, full, selective = (run(model, ids, p) for p in (None, "full", "selective"))
    for loss, grads, _ in (full, selective):
        assert torch.allclose(loss, plain[0], atol=1e-12)
        for a, b in zip(grads, plain[1]):
            assert torch.allclose(a, b, atol=1e-10)
    assert full[2] > plain[2]  # full recompute runs the forward matmuls again in backward
    assert selective[2] == plain[2], (selective[2], plain[2])  # selective keeps them: backward matmuls only


def test_unknown_checkpoint_policy_is_refused():
    with pytest.raises(ValueError, match=r"ac_policy 'some' is not supported; accepted: \['full', 'selective'\]"):
        ModelOptions(activation_checkpointing=True, ac_policy="some")


def test_pipeline_stage_keeps_the_selective_policy():
    """The pipeline stage runs the model's own layer loop: under the selective policy its backward recomputes no
    forward matmul (the stage used to copy the loop without the policy, i.e. ran full recompute)."""
    from openmoe.parallel.pipeline import Stage, stage_forward

    torch.manual_seed(0)
    model = OpenMoeForCausalLM(preset("tiny")).double().train()
    ids = torch.randint(3, 700, (2, 12))
    stage = Stage(first=True, last=False, layers=range(0, 2), num_moe_layers=model.config.num_moe_layers,
                  num_microbatches=1)
    counts, grads = {}, {}
    for policy in (None, "full", "selective"):
        model.zero_grad()
        model.apply_options(ModelOptions(activation_checkpointing=policy is not None, ac_policy=policy or "full"))
        out = stage_forward(model, ids, stage=stage)
        loss = out["hidden_states"].square().sum() + out["router_grad"]
        with CountMatmuls() as counter:
            loss.backward()
        counts[policy] = counter.n
        grads[policy] = [p.grad.clone() for p in model.model.layers[:2].parameters()]
    assert counts["full"] > counts[None]  # full recompute runs the forward matmuls again
    assert counts["selective"] == counts[None], counts  # selective keeps them
    for policy in ("full", "selective"):
        for a, b in zip(grads[policy], grads[None]):
            assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("field, value, message", [
    ("attn_impl", "flash", r"attn_impl 'flash' is not supported; accepted: \['sdpa', 'eager'\]"),
    ("expert_impl", "loop", r"expert_impl 'loop' is not supported; accepted: \['bmm', 'grouped'\]"),
    ("lm_loss_impl", "fast", r"lm_loss_impl 'fast' is not supported; accepted: \['fused', 'fused_compiled', "),
    ("lm_head_chunk_size", 0, r"lm_head_chunk_size \(0\) must be a positive integer or None"),
    ("dropless", 1, r"dropless \(1\) must be True or False"),
])
def test_model_options_are_validated_with_the_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        ModelOptions(**{field: value})


def test_apply_options_sets_and_restores_every_switch():
    model = OpenMoeForCausalLM(preset("tiny"), options=ModelOptions(attn_impl="eager", dropless=True))
    moe = [layer.mlp for layer in model.model.layers if layer.is_moe]
    assert {layer.self_attn.attn_impl for layer in model.model.layers} == {"eager"}
    assert {(m.capacity_factor_train, m.capacity_factor_eval) for m in moe} == {(0.0, 0.0)}
    model.apply_options(ModelOptions())
    cfg = model.config
    assert {layer.self_attn.attn_impl for layer in model.model.layers} == {"sdpa"}
    assert {(m.capacity_factor_train, m.capacity_factor_eval) for m in moe} == {
        (cfg.router_capacity_factor_train, cfg.router_capacity_factor_eval)}
    assert model.options == ModelOptions()


def fake_apex(monkeypatch, calls):
    """An `apex.normalization.fused_layer_norm` stand-in with apex's signature and math (fp32 statistics, weight
    applied in fp32, result in the input dtype), counting calls: tests the wiring, not the CUDA kernel."""
    import sys
    import types

    def fused_rms_norm_affine(x, weight, normalized_shape, eps):
        calls.append(tuple(normalized_shape))
        xf = x.float()
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)

    mod = types.ModuleType("apex.normalization.fused_layer_norm")
    mod.fused_rms_norm_affine = fused_rms_norm_affine
    for name in ("apex", "apex.normalization"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "apex.normalization.fused_layer_norm", mod)


def test_fused_rmsnorm_switch_runs_every_norm_and_matches_reference(monkeypatch):
    torch.manual_seed(0)
    model = OpenMoeForCausalLM(preset("tiny")).double().eval()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.uniform_(p, 0.5, 1.5)  # not all ones, so the weight's place in the formula matters
    ids = torch.randint(3, 700, (2, 10))
    ref = model(ids).logits
    calls = []
    fake_apex(monkeypatch, calls)
    model.apply_options(ModelOptions(fused_rmsnorm=True))
    n = sum(isinstance(m, RMSNorm) and m.fused is not None for m in model.modules())
    cfg = model.config
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    assert n == 2 * cfg.num_hidden_layers + moe_layers + 1  # input + post-attention, extra-MLP pre-norm, final
    got = model(ids).logits
    assert len(calls) == n and set(calls) == {(cfg.hidden_size,)}
    assert torch.allclose(got, ref, atol=1e-5)  # both normalise in fp32; the weight product rounds differently


def test_fused_rmsnorm_without_apex_is_one_clear_error(monkeypatch):
    import sys

    from openmoe.kernels import fused_rmsnorm_kernel

    monkeypatch.setitem(sys.modules, "apex", None)
    with pytest.raises(ValueError, match="--use_layernorm_kernel.? needs NVIDIA apex .* install apex or drop"):
        OpenMoeForCausalLM(preset("tiny"), options=ModelOptions(fused_rmsnorm=True))
    with pytest.raises(ValueError, match="--use_layernorm_kernel.? needs NVIDIA apex .* install apex or drop"):
        fused_rmsnorm_kernel()


def test_all_ones_attention_mask_is_dropped_before_the_device_and_changes_nothing():
    from openmoe.train.step import to_device

    torch.manual_seed(0)
    ids = torch.randint(3, 700, (2, 10))
    full = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    padded = {**full, "attention_mask": torch.ones_like(ids).index_fill(1, torch.tensor([8, 9]), 0)}
    assert "attention_mask" not in to_device([full, full], "cpu")[0]
    assert all("attention_mask" in b for b in to_device([full, padded], "cpu"))  # all of a step's batches or none
    model = OpenMoeForCausalLM(preset("tiny")).double().train()
    with_mask, without = model(**full), model(**to_device([full], "cpu")[0])
    assert torch.allclose(with_mask.loss, without.loss, atol=1e-12)
    assert torch.equal(with_mask.moe[0].tokens_per_expert, without.moe[0].tokens_per_expert)


def loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_blocks_equal_eager_with_and_without_checkpointing():
    """--compile_blocks (openmoe.kernels.compile_blocks, regional torch.compile) == the eager modules: loss and every
    parameter's gradient, fp32, with a padded row (explicit attention mask, masked routing), plain and under both
    activation-checkpointing policies; no graph breaks; state-dict keys unchanged."""
    import copy

    import torch._dynamo
    from torch._dynamo.utils import counters

    from openmoe.kernels import compile_blocks

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = OpenMoeForCausalLM(preset("tiny"), options=ModelOptions(dropless=True)).train()
    for name, p in eager.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.uniform_(p, 0.5, 1.5)  # not all ones, so the norm weight's gradient path matters
    fast = copy.deepcopy(eager)
    names = compile_blocks(fast)
    cfg = eager.config
    dense = [i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)]
    assert {f"model.layers.{i}" for i in dense} <= set(names) and "model.norm" in names
    assert not any(n.endswith(".mlp") and not n.endswith("extra_mlp") for n in names)  # MoE layers stay eager
    moe = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    assert {f"model.layers.{i}.mlp.experts.gated" for i in moe} <= set(names)  # ... but for the experts' activation
    assert all(fast.model.layers[i].mlp.experts.gated_fn is not None for i in moe)
    assert list(fast.state_dict()) == list(eager.state_dict())
    ids = torch.randint(3, 700, (2, 16))
    mask = torch.ones_like(ids).index_fill(1, torch.tensor([13, 14, 15]), 0)
    mask[0] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    for policy in (None, "full", "selective"):
        for m in (eager, fast):
            m.apply_options(ModelOptions(dropless=True, activation_checkpointing=policy is not None,
                                         ac_policy=policy or "full"))
        (l0, g0), (l1, g1) = loss_and_grads(eager, batch), loss_and_grads(fast, batch)
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n} ({policy}): {m}")
    assert counters["stats"]["unique_graphs"] >= 5  # dense layer, attention, RMSNorm, dense MLP, experts' activation
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_expert_activation_has_dynamic_rows_and_a_static_width():
    """The experts' compiled act(gate) * up: one graph for every dropless row count, its width a constant (a symbolic
    width cost ~3x in the GPU kernels, benchmark/RESULTS.md session 8), values and gradients equal to eager."""
    import torch._dynamo

    from openmoe.kernels import compiled_gated
    from openmoe.moe import swiglu

    torch._dynamo.reset()
    graphs = []

    def capture(gm, example_inputs):  # records each compiled graph's input shapes, runs it eagerly
        values = [n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"]
        graphs.append([tuple(v.shape) for v in values if isinstance(v, torch.Tensor)])
        return gm.forward

    fn = compiled_gated(swiglu, backend=capture)
    for rows in (5, 9, 17):
        gate, up = torch.randn(rows, 8, requires_grad=True), torch.randn(rows, 4, requires_grad=True)
        out = fn(gate, up)
        (out * torch.arange(4.0)).sum().backward()
        ref_gate, ref_up = gate.detach().requires_grad_(), up.detach().requires_grad_()
        ref = swiglu(ref_gate) * ref_up
        (ref * torch.arange(4.0)).sum().backward()
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(gate.grad, ref_gate.grad)
        torch.testing.assert_close(up.grad, ref_up.grad)
    assert len(graphs) == 1, graphs  # no recompile per row count
    (gate_shape, up_shape), = graphs
    assert isinstance(gate_shape[0], torch.SymInt) and isinstance(up_shape[0], torch.SymInt), graphs  # rows dynamic
    assert [type(d) for d in gate_shape[1:] + up_shape[1:]] == [int, int], graphs  # widths static (Python ints)
    assert gate_shape[1:] + up_shape[1:] == (8, 4)


@pytest.mark.parametrize("flags, message", [
    (dict(use_layernorm_kernel=True), r"--compile_blocks fuses the RMSNorms itself .* accepted: one of them"),
    (dict(plugin="hybrid", pp_size=2, ep_size=1), r"--compile_blocks is not supported with a pipeline \(--pp_size 2\)"),
])
def test_compile_blocks_refuses_what_it_does_not_support(flags, message):
    from openmoe.train.config import RunConfig

    with pytest.raises(ValueError, match=message):
        RunConfig.from_flat(compile_blocks=True, **flags)
    RunConfig.from_flat(**flags)  # each is accepted without --compile_blocks
