"""Resumable training checkpoints: `root/step-N/` holds

  model/                   the model in HF format (experts gathered, logical expert order; what from_pretrained loads)
  NAME.pt                  one state object shared by all ranks (scheduler, router_bias, expert_placement), rank 0
  NAME-rankRRRRR.pt        one state object per rank (optimizer: fp32 master shard + moments; rng)
  trainer_state.json       step, data position, world size, the run configuration
  manifest.json            written last: every file's size and CRC-32

All ranks write into `step-N.tmp`; rank 0 then writes the manifest and commits the directory with the same
replace step as every HF-format write (io/hf.replace_directory), so a save killed halfway leaves only a `.tmp`
directory, which `newest()` ignores, and a corrupt checkpoint is skipped (with a warning) for the previous one.
Collective: every rank calls save/newest. Never imports colossalai: optimizer state arrives as plain state objects.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import zlib

import torch
import torch.distributed as dist

from openmoe.config import OpenMoeConfig
from openmoe.io.hf import fsync_tree, replace_directory, write_checkpoint

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
MODEL_DIR = "model"


def file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def verify_checkpoint(path: str) -> str | None:
    """None when every file the manifest lists is present with its size and CRC-32; else what is wrong."""
    with open(os.path.join(path, MANIFEST)) as f:
        files = json.load(f)["files"]
    for rel, meta in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{full} is missing"
        size = os.path.getsize(full)
        if size != meta["size"]:
            return f"{full} has {size} bytes, its manifest says {meta['size']} (truncated or overwritten)"
        if file_crc32(full) != meta["crc32"]:
            return f"{full} fails its CRC-32 check (corrupted)"
    return None


def rank_file(name: str, rank: int) -> str:
    return f"{name}-rank{rank:05d}.pt"


class CheckpointManager:
    """save(step, ...) / newest() / read_*(path, ...) over the `step-N` directories under `root`; keeps the newest
    `keep_last` complete ones."""

    def __init__(self, root: str, keep_last: int):
        self.root, self.keep_last = root, keep_last

    def path(self, step: int) -> str:
        return os.path.join(self.root, f"step-{step:08d}")

    def complete(self) -> list[str]:
        """Committed checkpoint directories (holding a manifest), oldest first."""
        if not os.path.isdir(self.root):
            return []
        dirs = [os.path.join(self.root, d) for d in sorted(os.listdir(self.root))
                if d.startswith("step-") and not d.endswith(".tmp")]
        return [d for d in dirs if os.path.isfile(os.path.join(d, MANIFEST))]

    def save(self, step: int, *, config: OpenMoeConfig, model_state: dict[str, torch.Tensor] | None,
             shared: dict[str, object], per_rank: dict[str, object], trainer_state: dict) -> str:
        """Collective. model_state: the full single-device state dict on rank 0 (None elsewhere); shared: state
        objects identical on every rank (written by rank 0; None values skipped); per_rank: this rank's own."""
        rank, final = dist.get_rank(), self.path(step)
        tmp = final + ".tmp"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        if rank == 0:
            write_checkpoint(os.path.join(tmp, MODEL_DIR), config, model_state)
            for name, state in shared.items():
                if state is not None:
                    torch.save(state, os.path.join(tmp, f"{name}.pt"))
        for name, state in per_rank.items():
            torch.save(state, os.path.join(tmp, rank_file(name, rank)))
        dist.barrier()
        if rank == 0:
            self._commit(tmp, final, {"step": step, "world_size": dist.get_world_size(), **trainer_state})
        dist.barrier()
        return final

    def _commit(self, tmp: str, final: str, trainer_state: dict) -> None:
        with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
            json.dump(trainer_state, f, indent=2)
        fsync_tree(tmp)
        files = {}
        for dirpath, _, names in os.walk(tmp):
            for name in names:
                full = os.path.join(dirpath, name)
                files[os.path.relpath(full, tmp)] = {"size": os.path.getsize(full), "crc32": file_crc32(full)}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({"step": trainer_state["step"], "files": files}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        replace_directory(tmp, final)
        self.rotate()

    def rotate(self) -> None:
        done = self.complete()
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def newest(self) -> str | None:
        """Collective. Rank 0 checks the complete checkpoints newest first and falls back past corrupt ones with a
        warning; the choice is broadcast so that every rank loads the same one."""
        candidates = self.complete()[::-1]
        choice = [None]
        if dist.get_rank() == 0:
            for path in candidates:
                problem = verify_checkpoint(path)
                if problem is None:
                    choice[0] = path
                    break
                print(f"warning: checkpoint {path} is unusable: {problem}; trying the previous one", file=sys.stderr,
                      flush=True)
        dist.broadcast_object_list(choice, src=0)
        if choice[0] is None and candidates:
            raise ValueError(f"none of the {len(candidates)} checkpoints under {self.root} is usable (see the "
                             "warnings)")
        return choice[0]

    @staticmethod
    def read_trainer_state(path: str) -> dict:
        with open(os.path.join(path, TRAINER_STATE)) as f:
            return json.load(f)

    @staticmethod
    def read_shared(path: str, name: str):
        """The shared state object `name`, or None when this checkpoint has none."""
        file = os.path.join(path, f"{name}.pt")
        return torch.load(file, map_location="cpu", weights_only=False) if os.path.isfile(file) else None

    @staticmethod
    def read_rank(path: str, name: str, rank: int):
        return torch.load(os.path.join(path, rank_file(name, rank)), weights_only=False)

    @staticmethod
    def model_dir(path: str) -> str:
        return os.path.join(path, MODEL_DIR)
