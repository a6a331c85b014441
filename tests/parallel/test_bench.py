"""The training benchmark harness at a tiny shape on CPU/gloo, and the naive baseline's equivalence with our layer.

    .venv/bin/python -m pytest tests/parallel/test_bench.py -q          # ~80 s on 2 cores

* benchmark/naive_moe.py computes what OpenMoeSparseMLP computes (outputs, router losses, gradients of the input,
  the router and every expert), with drops, padding, dropless routing and the llama_moe family: the baseline is fair.
* benchmark/run_train_bench.py --tiny runs every kind (ours, baseline a Mixtral, baseline b naive) on 1 and 2 gloo
  processes plus the MoE-layer micro-benchmark, and writes sane records: positive throughput, the hand-counted FLOPs
  per token, MFU = FLOP/s / 989e12, an all-to-all share where all-to-all exists, a table naming every configuration.
* A failing or hanging configuration is recorded with its error line and does not stop the next one.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmark.naive_moe import NaiveSparseMLP
from openmoe import preset
from openmoe.moe import OpenMoeSparseMLP
from tests.helpers import ROOT
from tests.unit.test_bench_flops import hand_mixtral_flops_per_token, hand_openmoe_flops_per_token

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo smoke test of the GPU benchmark")


# ------------------------------------------------------------------ naive baseline == our layer
@pytest.mark.parametrize("case", ["drops", "dropless", "padding", "llama_moe"])
def test_naive_layer_equals_ours(case):
    over = {"router_capacity_factor_train": 0.5} if case in ("drops", "padding") else {}
    if case == "dropless":
        over["router_capacity_factor_train"] = 0.0
    if case == "llama_moe":
        over.update(model_family="llama_moe", router_combine="normalized")
    torch.manual_seed(0)
    ours = OpenMoeSparseMLP(preset("tiny", **over)).double().train()
    for p in ours.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    naive = NaiveSparseMLP.from_sparse(ours)
    x = torch.randn(3, 16, 64, dtype=torch.float64)
    mask = torch.ones(3, 16, dtype=torch.bool)
    if case == "padding":
        mask[1, 10:] = False
    outs = {}
    for name, layer in (("ours", ours), ("naive", naive)):
        xi = x.clone().requires_grad_()
        y, aux = layer(xi, mask)
        (y.square().sum() + aux.aux_loss + aux.z_loss).backward()
        outs[name] = (y, aux, xi.grad, layer.gate_weight.grad.clone())
        layer.gate_weight.grad = None  # the router Parameter is shared
    (y0, a0, gx0, gg0), (y1, a1, gx1, gg1) = outs["ours"], outs["naive"]
    if case in ("drops", "padding"):
        assert float(a0.dropped_fraction) > 0.1  # the capacity really drops choices here
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(a1.aux_loss, a0.aux_loss)
    torch.testing.assert_close(a1.tokens_per_expert, a0.tokens_per_expert)
    torch.testing.assert_close(gx1, gx0)
    torch.testing.assert_close(gg1, gg0)
    for name in ("wi_gate", "wi_up", "wo"):
        stacked = getattr(ours.experts, name).grad
        torch.testing.assert_close(torch.stack([getattr(e, name).grad for e in naive.experts]), stacked)


# ------------------------------------------------------------------ the harness end to end
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    res = subprocess.run([sys.executable, "benchmark/run_train_bench.py", "--tiny", "--jobs", "2", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    records = {}
    for name in os.listdir(out):
        if name.endswith(".json"):
            with open(out / name) as f:
                records[name[:-5]] = json.load(f)
    return out, res.stdout, records


def test_every_kind_on_one_and_two_processes_gives_sane_records(tiny_run):
    out, stdout, records = tiny_run
    from benchmark.run_train_bench import TINY_CONFIGS

    assert set(records) == {c.name for c in TINY_CONFIGS}
    for c in TINY_CONFIGS:
        r = records[c.name]
        assert r["error"] is None, (c.name, r["error"])
        if c.kind == "micro":
            continue
        assert r["gpus"] == c.nproc and r["kind"] == c.kind and r["shape"] == "tiny-L4"
        assert r["tokens_per_s_per_gpu"] > 0 and r["step_time_s"] > 0 and len(r["step_times_s"]) == 2
        # batch 2 x seq 64 per data-parallel rank and micro-batch; the 2-process rows accumulate 2 micro-batches
        assert r["options"]["grad_accum"] == c.nproc
        assert r["tokens_per_step"] == 2 * 64 * c.nproc * c.nproc
        want = hand_mixtral_flops_per_token() if c.kind == "mixtral" else hand_openmoe_flops_per_token()
        assert r["flops"]["flops_per_token"] == want, c.name
        achieved = want * r["tokens_per_s_per_gpu"]
        assert r["model_tflops_per_gpu"] == pytest.approx(achieved / 1e12)
        assert r["mfu"] == pytest.approx(achieved / 989e12)
        assert r["peak_mem_gib"] is None and r["host_peak_rss_gib"] > 0  # no GPU here
        assert r["routing"]["mode"].startswith("real") and r["routing"]["max_over_mean_load"] >= 1.0
        assert 0.0 <= r["comm_frac"] <= 1.0
        if c.nproc == 2 and c.kind in ("ours", "mixtral"):
            assert 0.0 < r["a2a_frac"] <= r["comm_frac"], c.name  # EP all-to-all over gloo
        if c.kind == "naive" or (c.kind == "ours" and c.nproc == 1):
            assert r["a2a_frac"] == 0.0
    ranges = records["tiny-2p-ours"]["profile_breakdown"]["ranges_ms"]  # the trainer's named ranges, per step
    for name in ("openmoe.forward", "openmoe.backward", "openmoe.optimizer_step", "openmoe.moe",
                 "openmoe.lm_head_loss"):
        assert ranges[name] > 0, (name, ranges)
    assert ranges["openmoe.forward"] > ranges["openmoe.moe"]  # nested: MoE layers run inside the forward
    assert records["tiny-2p-ours"]["layout"] == {"plugin": "ep", "ep": 2, "pp": 1, "dp": 2, "moe_dp": 1}
    assert records["tiny-1p-ours"]["label"].startswith("ours (grouped GEMM")
    # --compile_blocks --lean_zero --adamw_kernel --load_balance --skew_router through the harness (ep)
    compiled = records["tiny-2p-ours-grouped-dropless"]
    assert compiled["options"]["compile_blocks"] and compiled["options"]["lean_zero"]
    assert compiled["options"]["adamw_kernel"] and compiled["options"]["load_balance"]
    assert compiled["options"]["skew_router"] == 3.0
    assert compiled["label"].endswith(", compiled blocks, lean ZeRO-1, experts rebalanced, AdamW kernel, router tilted "
                                      "to the first half of the experts (3))")
    moved = compiled["routing"]  # one move after the only warmup step, planned on its counts; no step skipped
    assert moved["rebalanced_after_step"] == 1 and moved["skipped_steps"] == 0
    # the tilted routers send most choices to EP rank 0's experts (untilted random routers: about half), the move
    # swaps some of them to rank 1 and evens the ranks' load
    assert all(share > 0.75 for share in moved["skewed_router_share_first_half"]), moved
    assert moved["experts_swapped"] >= 1 and moved["ep_rank_max_over_mean_before"] > 1.1, moved
    assert 1.0 <= moved["ep_rank_max_over_mean_after"] < moved["ep_rank_max_over_mean_before"]
    micro = records["tiny-micro"]
    assert [row["impl"] for row in micro["rows"]] == ["dense-equivalent", "bmm", "grouped", "grouped-dropless",
                                                      "naive"]
    assert all("error" not in row and row["model_tflops"] > 0 for row in micro["rows"])
    assert all(row["vs_dense"] > 0 for row in micro["rows"][1:])
    table = (out / "summary.md").read_text()
    for c in TINY_CONFIGS:
        if c.kind != "micro":
            assert f"| {c.name} |" in table
    assert "| grouped-dropless |" in table and "989 TFLOP/s" in table
    # the ratio columns compare rows of the same shape, GPU count and accumulation: baseline a against itself is 1.00
    row = next(line for line in table.splitlines() if line.startswith("| tiny-2p-mixtral |"))
    assert row.split("|")[10].strip() == "1.00"


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def test_a_failing_or_hanging_configuration_is_recorded_and_the_next_runs(tmp_path):
    from benchmark.run_train_bench import TINY, Config, run_one
    from benchmark.summarize_bench import summarize

    bad = run_one(Config("tiny-bad", 1, "naive", TINY + ("--layers", "1")), str(tmp_path), timeout=120)
    assert "has no MoE layer" in bad["error"] and bad["exit_code"] != 0
    hung = run_one(Config("tiny-hung", 1, "naive", TINY), str(tmp_path), timeout=1)
    assert hung["error"] == "timed out after 1 s"
    # torchrun puts its workers in sessions of their own: a timeout must still end every one of them
    hung2 = run_one(Config("tiny-hung2", 2, "naive", TINY + ("--steps", "100000")), str(tmp_path), timeout=8)
    assert hung2["error"] == "timed out after 8 s"
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and str(tmp_path) in _cmdline(pid)]
    text = summarize([str(tmp_path)])
    assert "| tiny-bad |" in text and "**error**: ValueError: tiny truncated to 1 layers has no MoE layer" in text


def test_ours_runs_the_shape_it_is_given(tmp_path):
    """--layers / --moe_layer_interval reach the model ours builds through the trainer's builder (they once did not:
    the builder re-read the bare preset, so a truncated 8B row ran all 24 layers)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                          "benchmark/train_bench.py", "--kind", "ours", "--name", "l2", "--out", str(tmp_path),
                          "--model", "tiny", "--layers", "2", "--moe_layer_interval", "1", "--seq", "64",
                          "--batch_size", "2", "--warmup", "1", "--steps", "1", "--profile_steps", "0"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    flops = json.load(open(tmp_path / "l2.json"))["flops"]
    h, i, e = 64, 128, 4  # tiny: hidden, expert width, experts; per expert wi_gate [h, 2i], wi_up [h, i], wo [i, h]
    assert (flops["num_layers"], flops["expert_params"]) == (2, 2 * e * (h * 2 * i + h * i + i * h)), flops
