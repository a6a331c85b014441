"""Fast paths beside their references: selective activation checkpointing == no checkpointing (values and grads),
and it really keeps the matmul outputs (no forward matmul runs again in backward)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from openmoe.config import preset
from openmoe.model import OpenMoeForCausalLM


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
    model.model.gradient_checkpointing = policy is not None
    model.model.checkpoint_policy = policy or "full"
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
    model = OpenMoeForCausalLM(preset("tiny")).train()
    model.model.gradient_checkpointing, model.model.checkpoint_policy = True, "some"
    with pytest.raises(ValueError, match="checkpoint policy 'some' is not supported; accepted: 'full', 'selective'"):
        model(torch.randint(3, 700, (1, 4)))
