"""benchmark/infer_fast_bench.py: the bandwidth-bound bytes against a hand count of OpenMoE-8B, and a CPU smoke run
whose fast rows decode the eager rows' tokens."""

import json

import pytest
import torch

from benchmark.infer_fast_bench import decode_step_bytes, experts_hit, main, param_counts
from openmoe import OpenMoeForCausalLM, preset

# OpenMoE-8B by hand (H 2048, 24 layers, 24 heads x 128, I 8192 with a 2I gate, 32 experts on layers 5, 11, 17, 23)
ATTENTION = 24 * 4 * 2048 * 3072  # q, k, v [3072, 2048] and o [2048, 3072] per layer
MLP = 2048 * 16384 + 2048 * 8192 + 8192 * 2048  # gate (2I), up, down: one dense MLP, and one expert
DENSE = ATTENTION + (20 + 4) * MLP + (24 * 2 + 4 + 1) * 2048 + 4 * 32 * 2048 + 256384 * 2048
#                  20 dense + 4 extra MLPs   norms (2/layer, extra-MLP pre-norms, final)  routers   LM head


def test_bound_bytes_match_a_hand_count_of_openmoe_8b():
    cfg = preset("8b")
    with torch.device("meta"):
        model = OpenMoeForCausalLM(cfg, init=False)
    counts = param_counts(model)
    assert counts == {"expert": 4 * 32 * MLP, "embedding": 256384 * 2048, "dense": DENSE}
    assert DENSE + 4 * 2 * MLP == 3_276_908_544  # the "~3.3B parameters touched at batch 1"
    assert decode_step_bytes(cfg, counts, 1, context=0) == 2 * 3_276_908_544
    assert experts_hit(32, 2, 1) == pytest.approx(2.0)
    assert experts_hit(32, 2, 16) == pytest.approx(32 * (1 - (30 / 32) ** 16))
    assert decode_step_bytes(cfg, counts, 16, 0, all_experts=True) == 2 * (DENSE + 4 * 32 * MLP)
    kv_160 = 2 * 24 * 1 * 24 * 128 * 160 * 2  # K and V, 24 layers, 24 heads x 128, 160 tokens, bf16
    assert decode_step_bytes(cfg, counts, 1, context=160) - decode_step_bytes(cfg, counts, 1, 0) == kv_160


def test_cpu_smoke_run_fast_rows_decode_the_eager_tokens(tmp_path):
    assert main(["--model", "tiny", "--batch_sizes", "1", "2", "--prompt_len", "8", "--new_tokens", "6",
                 "--short_tokens", "2", "--moe_impls", "gather", "dense", "--ttft_prompt_len", "16", "--warmup", "1",
                 "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "infer_fast_bench.json").read_text())["rows"]
    decode = [r for r in rows if "decode_ms_per_step" in r]
    assert [(r["batch"], r["path"]) for r in decode] == [(b, p) for b in (1, 2) for p in
                                                         ("hf generate", "fast gather", "fast dense")]
    assert all(r["token_agreement_with_eager"] == 1.0 for r in decode if r["path"] != "hf generate")
    assert [r["path"] for r in rows if "ttft_ms" in r] == ["hf generate", "fast (SDPA prefill)"]


def test_kernel_check_passes_and_fails_on_a_wrong_expert_path(tmp_path, monkeypatch):
    """--check_kernels_only on the CPU: the expert GEMV (its reference here), the grouped GEMM and the gathered
    weights agree, fused == separate projections; a wrong expert path makes it exit 1."""
    import benchmark.infer_fast_bench as bench

    out = tmp_path / "not_yet_there"  # created by the script (the H200 run of 8b7fe52 crashed on a missing --out)
    assert main(["--model", "tiny", "--check_kernels_only", "--out", str(out)]) == 0
    report = json.loads((out / "kernel_check.json").read_text())
    experts = [r for r in report["rows"] if r["check"] == "experts"]
    assert [r["tokens"] for r in experts] == [1, 2, 4, 16] and all("grouped_rel_err" in r for r in experts)
    assert all(r["gemv_rel_err"] <= report["tolerance"] for r in experts)
    assert [r["check"] for r in report["rows"] if r["check"] != "experts"] == ["fused qkv", "fused gate_up"]
    monkeypatch.setattr(bench, "expert_gemv", lambda experts, x, r: bench.gathered_experts(experts, x.flip(0), r))
    assert main(["--model", "tiny", "--check_kernels_only", "--out", str(tmp_path)]) == 1


def test_tile_sweep_returns_a_tiling_and_records_each_choice():
    """On the CPU the GEMV is its reference and nothing is timed: the sweep still walks both stages and returns
    the default tiling (every time is unknown)."""
    from benchmark.infer_fast_bench import sweep_tiles
    from openmoe.decode_kernels import GemvTiles, gathered_experts
    from openmoe.moe import OpenMoeExperts
    from openmoe.router import route

    experts = OpenMoeExperts(4, 16, 32)
    for w in (experts.wi_gate, experts.wi_up, experts.wo):
        torch.nn.init.normal_(w, 0.0, 0.2)
    x = torch.randn(1, 16)
    r = route(x, torch.randn(4, 16), 2, 0.0, 0, True, size_dropless=False)
    rows = []
    with torch.no_grad():
        best = sweep_tiles(experts, x, r, gathered_experts(experts, x, r).float(), 1e-4, torch.device("cpu"), rows)
    assert best == GemvTiles() and all(row["rel_err"] == 0.0 for row in rows)
    assert len(rows) == 5 + 4  # gate/up choices, then down choices
