"""Timing, memory and communication-share helpers shared by the benchmark scripts (torch only)."""

from __future__ import annotations

import resource
import statistics
import time

import torch

A2A_KERNEL_MARKS = ("sendrecv", "alltoall", "all_to_all")  # NCCL runs all_to_all_single as grouped send/recv


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, iters: int, warmup: int = 1) -> list[float]:
    """Wall seconds of each of `iters` calls of fn (after `warmup` calls), synchronised around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def gemm_peak_tflops(device: torch.device, n: int = 8192, iters: int = 30) -> float | None:
    """Measured bf16 dense GEMM throughput: median over `iters` n x n x n matmuls (2 n^3 FLOPs each). None on CPU."""
    if device.type != "cuda":
        return None
    mats = [torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2)]
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    times = timed(lambda: torch.matmul(*mats, out=out), device, iters, warmup=5)
    mats.clear()
    out = None  # free the buffers before the cache is emptied
    torch.cuda.empty_cache()
    return 2 * n**3 / median(times) / 1e12


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> tuple[float | None, float | None]:
    """(peak allocated, peak reserved) GiB since the last reset; (None, None) on CPU."""
    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30


def host_peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def comm_seconds(prof) -> dict:
    """Seconds spent in all-to-all and in all communication during a torch.profiler capture.

    GPU: summed durations of CUDA kernels; all-to-all = kernels whose name contains SendRecv/AllToAll/all_to_all
    (NCCL implements all_to_all_single as grouped ncclSend/ncclRecv, one SendRecv kernel per call; note that pipeline
    p2p also uses SendRecv), all communication = kernels whose name contains "nccl". Kernels on the NCCL stream may
    overlap compute, so the share of step time is an upper bound on exposed communication.
    CPU (gloo): wall time of the `gloo:*` operations (they include waiting for the slowest peer).
    """
    from torch.autograd import DeviceType

    events = list(prof.events())
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    if kernels:
        def dur(e):
            return (e.time_range.end - e.time_range.start) / 1e6

        a2a = sum(dur(e) for e in kernels if any(m in e.name.lower() for m in A2A_KERNEL_MARKS))
        comm = sum(dur(e) for e in kernels if "nccl" in e.name.lower())
        return {"a2a_s": a2a, "comm_s": comm, "method": "CUDA kernel time (SendRecv/AllToAll kernels; nccl* kernels)"}
    gloo = [e for e in events if e.name.startswith("gloo:")]
    a2a = sum(e.cpu_time_total for e in gloo if "all_to_all" in e.name) / 1e6
    comm = sum(e.cpu_time_total for e in gloo) / 1e6
    return {"a2a_s": a2a, "comm_s": comm, "method": "CPU wall time of gloo ops (includes waiting for peers)"}
