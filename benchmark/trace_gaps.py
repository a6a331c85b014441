"""Where a profiled step's GPU time goes, from the Chrome traces `train_bench.py --trace` writes
(OUT/NAME.rankR.trace.json.gz): span, time with any kernel running, time with a non-NCCL kernel running, idle time and
its gaps, the kernels that take the most time (GEMMs pooled), and per gap > 100 us the host op that launched the
kernel after it (what the GPU was waiting for).

    python benchmark/trace_gaps.py OUT/NAME.rank0.trace.json.gz [--top 25]

Kernels are the trace's `kernel`, `gpu_memcpy` and `gpu_memset` events; busy time is the length of their union (a
kernel overlapping another on a second stream counts once). Used for benchmark/RESULTS.md, "Issue 19, session 7".
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json

KERNEL_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
GAP_US = 100.0


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def union_us(events: list[dict]) -> tuple[float, list[tuple[float, dict]]]:
    """(length of the union of [ts, ts + dur), the gaps between its pieces as (gap, the event after the gap))."""
    busy, gaps, start, end = 0.0, [], None, None
    for e in sorted(events, key=lambda e: e["ts"]):
        s, t = e["ts"], e["ts"] + e["dur"]
        if end is None:
            start, end = s, t
        elif s > end:
            busy, gaps = busy + end - start, gaps + [(s - end, e)]
            start, end = s, t
        else:
            end = max(end, t)
    return busy + (end - start if end is not None else 0.0), gaps


def kernel_name(name: str) -> str:
    return "GEMM" if name.startswith("nvjet") or "cutlass" in name or "gemm" in name.lower() else name[:120]


def summarize(events: list[dict], top: int = 25) -> dict:
    kernels = [e for e in events if e.get("cat") in KERNEL_CATS]
    if not kernels:
        return {"kernels": 0}
    span = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    busy, gaps = union_us(kernels)
    compute, _ = union_us([e for e in kernels if "nccl" not in e["name"].lower()])
    per = collections.defaultdict(lambda: [0.0, 0])
    for e in kernels:
        row = per[kernel_name(e["name"])]
        row[0], row[1] = row[0] + e["dur"], row[1] + 1
    launch = {e["args"].get("correlation"): e for e in events if e.get("cat") == "cuda_runtime"}
    host_ops = sorted((e for e in events if e.get("cat") in ("cpu_op", "user_annotation")), key=lambda e: e["ts"])
    waits = collections.defaultdict(lambda: [0.0, 0])
    for gap, after in gaps:
        if gap <= GAP_US:
            continue
        r = launch.get(after.get("args", {}).get("correlation"))
        inner = [o["name"] for o in host_ops if r and o["tid"] == r["tid"] and o["ts"] <= r["ts"] <= o["ts"] + o["dur"]]
        row = waits[(inner[-1] if inner else "?") + " -> " + kernel_name(after["name"])[:50]]
        row[0], row[1] = row[0] + gap, row[1] + 1
    ms = lambda us: round(us / 1e3, 2)  # noqa: E731
    return {"kernels": len(kernels), "span_ms": ms(span), "busy_ms": ms(busy), "compute_busy_ms": ms(compute),
            "idle_ms": ms(span - busy), "gaps": len(gaps),
            "idle_in_gaps_over_100us_ms": ms(sum(g for g, _ in gaps if g > GAP_US)),
            "top_kernels_ms": [(n, ms(t), c) for n, (t, c) in sorted(per.items(), key=lambda x: -x[1][0])[:top]],
            "gap_launchers_ms": [(n, ms(t), c) for n, (t, c) in sorted(waits.items(), key=lambda x: -x[1][0])[:top]]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace")
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args(argv)
    s = summarize(load(a.trace), a.top)
    if not s["kernels"]:
        raise SystemExit(f"{a.trace}: no GPU kernels in this trace (a CPU run?)")
    print(f"span {s['span_ms']} ms, GPU busy {s['busy_ms']} (compute {s['compute_busy_ms']}), idle {s['idle_ms']} in "
          f"{s['gaps']} gaps ({s['idle_in_gaps_over_100us_ms']} ms in gaps > 100 us)")
    print("kernel time, ms (calls):")
    for n, t, c in s["top_kernels_ms"]:
        print(f"  {t:9.2f} {c:6d}  {n}")
    print("gaps > 100 us by the host op that launched the kernel after them, ms (gaps):")
    for n, t, c in s["gap_launchers_ms"]:
        print(f"  {t:9.2f} {c:6d}  {n}")


if __name__ == "__main__":
    main()
