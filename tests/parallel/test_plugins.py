"""ColossalAI plugin equivalence: one training step of the `ep` / `ep_zero` plugins (bf16, ZeRO-1, gloo) gives the
loss and reduced gradients of a single fp32 process that runs the same global batch.

The reference runs each data-parallel rank's slice as its own batch and averages the losses, which is exactly the
data-parallel objective (capacity and routing priority are per local batch, as in the original).
Tolerance: ColossalAI's MoE plugin requires ZeRO >= 1 with expert parallelism and ZeRO requires bf16/fp16, so the
parallel run computes in fp16 or bf16 against an fp32 reference. fp16 (11-bit significand, ~5e-4 relative per op)
gives gradients within 0.3% (measured), so we require 1%; bf16 (8 bits) amplifies in the router's softmax-Jacobian
gradient (measured up to ~9%), so its case is held to 5% with routing made decisive (see build_test_model) and
serves as the configuration users run. A wrong expert-gradient scale (1/ep_size) or experts missing from the
optimizer's reduction show up as 50-100% error.
"""

import os
import subprocess
import sys

import pytest
import torch

from openmoe import trainer
from openmoe.run_config import parse_args
from tests.parallel.dist_utils import free_port
from tests.parallel.plugin_worker import B, build_test_model, global_batch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def torchrun(nproc: int, script: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), script, *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return res


def reference(args: list[str], dp_size: int):
    run = parse_args(args)
    cfg = trainer.model_config(run)
    model = build_test_model(run, cfg)
    ids = global_batch(dp_size, cfg.vocab_size)
    loss = sum(model(input_ids=ids[r * B:(r + 1) * B], labels=ids[r * B:(r + 1) * B]).loss
               for r in range(dp_size)) / dp_size
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


# (processes, train.py options, gradient tolerance (relative L2 per tensor), loss tolerance)
CASES = {
    "ep-dropless-fp16": (2, ["--plugin", "ep", "--dropless", "--precision", "fp16"], 0.01, 1e-3),
    "ep-capacity-fp16": (2, ["--plugin", "ep", "--router_aux_loss_factor", "0.5", "--precision", "fp16"], 0.01, 1e-3),
    "ep_zero-fp16": (4, ["--plugin", "ep_zero", "--extra_dp_size", "2", "--precision", "fp16"], 0.01, 1e-3),
    "ep-bf16": (2, ["--plugin", "ep", "--precision", "bf16"], 0.05, 0.03),
}


@pytest.mark.parametrize("case", list(CASES))
def test_plugin_step_matches_single_process(case, tmp_path):
    nproc, args, grad_tol, loss_tol = CASES[case]
    out = tmp_path / "grads.pt"
    torchrun(nproc, "tests/parallel/plugin_worker.py", str(out), *args)
    got = torch.load(out, weights_only=False)
    assert got["sizes"].dp == nproc
    ref_loss, ref_grads = reference(args, nproc)
    assert abs(got["loss"] - ref_loss) < loss_tol, (got["loss"], ref_loss)
    assert set(got["grads"]) == set(ref_grads)
    errors = {n: ((got["grads"][n] - g).norm() / g.norm()).item() for n, g in ref_grads.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < grad_tol, (worst, errors[worst])
    # the clipping norm is the true global norm (ColossalAI's own is wrong under EP; see fix_grad_clipping)
    ref_norm = torch.sqrt(sum(g.double().square().sum() for g in ref_grads.values())).item()
    assert abs(got["grad_norm"] - ref_norm) / ref_norm < grad_tol, (got["grad_norm"], ref_norm)
