"""Baseline (c)'s per-expert loop layer (benchmark/naive_moe.py LoopSparseMLP) computes what the obviously-correct
per-token reference (`openmoe.moe.reference_moe_forward`) computes: outputs, router decisions and losses, and the
gradients of the input, the router and every expert (fp64, with drops, padding and dropless routing). And the
FSDP2 harness kind runs end to end on 2 gloo processes at the tiny shape and writes a sane record.

    .venv/bin/python -m pytest tests/unit/test_bench_loop.py -q
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmark.naive_moe import LoopSparseMLP
from openmoe import preset
from openmoe.moe import OpenMoeSparseMLP, moe_aux, reference_moe_forward

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("case", ["drops", "dropless", "padding"])
def test_loop_layer_equals_reference(case):
    cf = 0.0 if case == "dropless" else 0.5
    torch.manual_seed(0)
    ref = OpenMoeSparseMLP(preset("tiny", router_capacity_factor_train=cf)).double().train()
    for p in ref.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    loop = LoopSparseMLP(ref)
    x = torch.randn(3, 16, 64, dtype=torch.float64)
    mask = torch.ones(3, 16, dtype=torch.bool)
    if case == "padding":
        mask[1, 10:] = False
    g = torch.randn_like(x)

    xr = x.clone().requires_grad_()
    y_ref, r = reference_moe_forward(ref, xr, mask)
    a_ref = moe_aux(r, ref.router_aux_loss_type, x.shape[:-1])
    ((y_ref * g).sum() + a_ref.aux_loss + a_ref.z_loss).backward()
    gate_ref = ref.gate_weight.grad.clone()
    ref.gate_weight.grad = None  # the router Parameter is shared with the loop layer

    xl = x.clone().requires_grad_()
    y, a = loop(xl, mask)
    ((y * g).sum() + a.aux_loss + a.z_loss).backward()

    if case != "dropless":
        assert float(a.dropped_fraction) > 0.1  # capacity 0.5 really drops choices
    else:
        assert float(a.dropped_fraction) == 0.0
    torch.testing.assert_close(a.tokens_per_expert, a_ref.tokens_per_expert)
    torch.testing.assert_close(a.aux_loss, a_ref.aux_loss)
    torch.testing.assert_close(y, y_ref.view_as(y))
    torch.testing.assert_close(xl.grad, xr.grad)
    torch.testing.assert_close(loop.gate_weight.grad, gate_ref)
    for e, expert in enumerate(loop.experts):
        for name in ("wi_gate", "wi_up", "wo"):
            torch.testing.assert_close(getattr(expert, name).grad, getattr(ref.experts, name).grad[e])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo smoke test of the GPU benchmark")
def test_fsdp_kind_runs_on_two_processes(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmark", "run_train_bench.py"), "--tiny", "--only", "tiny-2p-fsdp",
           "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=240)
    rec = json.loads((tmp_path / "tiny-2p-fsdp.json").read_text())
    assert rec["error"] is None, rec["error"]
    assert rec["layout"]["plugin"] == "torch FSDP2 (fully_shard)" and rec["gpus"] == 2
    assert rec["routing"]["dropped_fraction"] == 0.0  # the row runs dropless
    assert rec["tokens_per_step"] == 2 * 2 * 64 * 2  # 2 ranks x 2 rows x 64 tokens x 2 micro-batches
    assert rec["tokens_per_s_per_gpu"] > 0 and rec["gemm_bound_step_s"] is None  # no GEMM peak measured on CPU
