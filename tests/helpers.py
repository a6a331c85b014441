"""Launchers and small utilities shared by the tests: free ports, in-process gloo workers, torchrun and
`colossalai run` subprocesses, metrics files."""

import json
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def launch(fn, world: int, *args) -> None:
    """Run fn(rank, world, *args) on `world` processes; raises if any process fails."""
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True, start_method="spawn")


def torchrun(nproc: int, script: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """`script` (a path under the repository, e.g. tests/parallel/plugin_worker.py) on nproc ranks, run as a module
    (`-m tests.parallel.plugin_worker`) so that it imports `tests` and `openmoe` like the test process does."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PATH"] = BIN + os.pathsep + env["PATH"]
    module = os.path.splitext(os.path.relpath(os.path.join(ROOT, script), ROOT))[0].replace(os.sep, ".")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), "-m", module, *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return res


def colossalai_run(nproc: int, *args: str, timeout: int = 300, env: dict | None = None
                   ) -> subprocess.CompletedProcess:
    """train.py through the real `colossalai run` launcher on one node."""
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"], OMP_NUM_THREADS="1", **(env or {}))
    cmd = [os.path.join(BIN, "colossalai"), "run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
           "train.py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def metrics(path) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]


def micro_batches(step: int, rank: int, vocab: int, batch: int, seq: int, count: int = 2) -> list[dict]:
    """`count` random micro-batches [batch, seq] of one optimizer step, labels = inputs, distinct per step and rank
    (the same on every call: two training runs compared step by step see the same data)."""
    g = torch.Generator().manual_seed(100 * step + rank)
    out = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out

