"""train.py options wired end to end through `colossalai run`: comm overlap, bias balancing (saved and restored),
frozen parameters, grouped-GEMM experts."""

import json
import os

import torch

from openmoe import OpenMoeForCausalLM, preset
from tests.helpers import colossalai_run, metrics
from tests.parallel.test_train_cli import COMMON


def run_ok(nproc, out, *args):
    res = colossalai_run(nproc, *args, "--output_path", str(out), *COMMON)
    log = res.stdout + res.stderr
    assert res.returncode == 0 and "done:" in log, log[-4000:]
    return metrics(out)


def test_comm_overlap_trains_like_the_plain_all_to_all(tmp_path):
    plain = run_ok(2, tmp_path / "plain", "--max_steps", "4")
    overlap = run_ok(2, tmp_path / "overlap", "--max_steps", "4", "--comm_overlap", "3")
    # same arithmetic in a different order (bf16): losses agree closely, step by step
    for a, b in zip(plain, overlap):
        assert abs(a["loss"] - b["loss"]) < 2e-2, (a["step"], a["loss"], b["loss"])


def test_bias_balancing_is_saved_and_restored(tmp_path):
    out = tmp_path / "bias"
    args = ["--max_steps", "6", "--save_interval", "3", "--keep_last", "3", "--balance_mode", "bias",
            "--bias_update_rate", "0.01"]
    run_ok(2, out, *args)
    saved = torch.load(out / "checkpoints" / "step-00000006" / "router_bias.pt")
    assert saved["bias"].shape == (2, 4) and saved["bias"].abs().max() > 0
    # every step moves each bias by exactly +-rate (or 0 on ties): after 6 steps they are multiples of 0.01
    assert torch.allclose(saved["bias"] / 0.01, (saved["bias"] / 0.01).round(), atol=1e-4)
    # resume from step 3 restores the biases: steps 4-6 repeat bitwise
    part = tmp_path / "part"
    os.makedirs(part / "checkpoints")
    os.rename(out / "checkpoints" / "step-00000003", part / "checkpoints" / "step-00000003")
    (part / "metrics.jsonl").write_text("".join(open(out / "metrics.jsonl").readlines()[:3]))
    resumed = run_ok(2, part, *args, "--resume")
    assert [r["loss"] for r in resumed[3:]] == [r["loss"] for r in metrics(out)[3:]]


def test_frozen_experts_do_not_move_and_grouped_kernel_runs(tmp_path):
    out = tmp_path / "frozen"
    # ep_zero with extra_dp 2 on 2 ranks: ep 1, so MoE layers stay single-device and --use_kernel applies
    run_ok(2, out, "--plugin", "ep_zero", "--extra_dp_size", "2", "--max_steps", "3", "--trainable", "non_expert",
           "--use_kernel")
    saved_run = json.load(open(out / "checkpoints" / "step-00000003" / "trainer_state.json"))["run"]
    torch.manual_seed(saved_run["optim"]["seed"])
    start = OpenMoeForCausalLM(preset("tiny"))
    trained = OpenMoeForCausalLM.from_pretrained(str(out / "hf"))
    moved = {n: (p.float() - start.state_dict()[n].to(p.dtype).float()).abs().max().item()
             for n, p in trained.state_dict().items()}
    assert all(v == 0 for n, v in moved.items() if ".experts." in n)
    assert moved["lm_head.weight"] > 0 and moved["model.layers.1.mlp.gate_weight"] > 0
