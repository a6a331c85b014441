"""benchmark/infer_multi_gpu_bench.py on CPU: both modes run on the tiny preset (device map: one process; expert
parallel: 2 gloo ranks, an odd batch) and decode the greedy tokens of a single-device model holding the same weights;
the bandwidth bound of expert parallelism reduces to the single-device one at one rank."""

import json
import os
import subprocess
import sys

import torch

from benchmark.infer_fast_bench import decode_step_bytes, param_counts
from benchmark.infer_multi_gpu_bench import meta_model, step_bound
from openmoe import preset
from tests.helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["--models", "tiny", "--check", "--batch_sizes", "1", "3", "--prompt_len", "12", "--new_tokens", "6",
         "--short_tokens", "2"]


def test_both_modes_decode_what_one_device_decodes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = os.path.join("benchmark", "infer_multi_gpu_bench.py")
    runs = {"device_map": [sys.executable, script, "--mode", "device_map"],
            "ep": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), script, "--mode", "ep"]}
    for mode, cmd in runs.items():
        res = subprocess.run([*cmd, *SMALL, "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        record = json.loads((tmp_path / f"infer_multi_gpu_{mode}.json").read_text())
        assert record["world"] == (2 if mode == "ep" else 1)
        assert [r["batch"] for r in record["rows"]] == [1, 3]
        for row in record["rows"]:
            assert row["token_agreement_with_single_device"] == 1.0, (mode, row)
            assert row["decode_tokens_per_s"] > 0
            assert abs(row["of_bound"] - row["decode_tokens_per_s"] / row["bound_tokens_per_s"]) < 1e-9


def test_expert_parallel_bound_reduces_to_one_device():
    cfg = preset("8b")
    counts = param_counts(meta_model("8b", torch.bfloat16))
    for batch in (1, 16):
        one = decode_step_bytes(cfg, counts, batch, 144)
        assert step_bound(cfg, counts, "device_map", batch, 2, 144)[0] == one  # layers run one GPU at a time
        assert abs(step_bound(cfg, counts, "ep", batch, 1, 144)[0] - one) < 1
        two = step_bound(cfg, counts, "ep", batch, 2, 144)[0]
        # 2 ranks: each reads the dense weights, half of the touched experts and its rows' KV cache
        assert one / 2 < two < one
