"""benchmark/trace_gaps.py on a hand-built Chrome trace whose busy time, idle gaps and launchers are known."""

import gzip
import json

from benchmark.trace_gaps import load, main, summarize


def trace() -> list[dict]:
    k = lambda name, ts, dur, corr=None: {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur,  # noqa: E731
                                          "args": {"correlation": corr}}
    return [
        k("nvjet_gemm_a", 0, 100),            # [0, 100)
        k("ncclDevKernel_SendRecv", 50, 100),  # [50, 150): overlaps the GEMM on another stream
        k("triton_add", 400, 50, corr=7),     # gap 250 us after 150, launched by aten::add
        k("cutlass_gemm_b", 460, 40),         # gap 10 us (not counted among the > 100 us gaps)
        {"ph": "X", "cat": "gpu_memset", "name": "Memset", "ts": 500, "dur": 20, "args": {}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 390, "dur": 2, "tid": 1,
         "args": {"correlation": 7}},
        {"ph": "X", "cat": "cpu_op", "name": "openmoe.moe", "ts": 300, "dur": 200, "tid": 1, "args": {}},
        {"ph": "X", "cat": "cpu_op", "name": "aten::add", "ts": 385, "dur": 10, "tid": 1, "args": {}},
        {"ph": "i", "name": "instant event, not a duration", "ts": 0},
    ]


def test_busy_idle_kernels_and_launchers(tmp_path, capsys):
    s = summarize(trace())
    assert s["span_ms"] == 0.52 and s["busy_ms"] == 0.26 and s["idle_ms"] == 0.26  # [0,150) + [400,450) + [460,520)
    assert s["compute_busy_ms"] == 0.21 and s["gaps"] == 2 and s["idle_in_gaps_over_100us_ms"] == 0.25
    assert s["top_kernels_ms"][0] == ("GEMM", 0.14, 2)  # both GEMM kernels pooled
    assert s["gap_launchers_ms"] == [("aten::add -> triton_add", 0.25, 1)]  # the innermost host op at the launch
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": trace()}, f)
    assert len(load(str(path))) == 8
    main([str(path)])
    assert "span 0.52 ms, GPU busy 0.26 (compute 0.21), idle 0.26 in 2 gaps (0.25 ms in gaps > 100 us)" in \
        capsys.readouterr().out
