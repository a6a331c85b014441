"""Resumable training checkpoints: `root/step-N/` holds

  model/                   the model in HF format (experts gathered, logical expert order; what from_pretrained loads)
  NAME.pt                  one state object shared by all ranks (scheduler, router_bias, expert_placement), rank 0
  NAME-rankRRRRR.pt        one state object per rank (optimizer: fp32 master shard + moments; rng)
  trainer_state.json       step, data position, world size, the run configuration
  manifest.json            written last: every file's size and CRC-32

All ranks write into `step-N.tmp`; rank 0 then writes the manifest and commits the directory with the same
replace step as every HF-format write (io/hf.replace_directory: an existing step-N is renamed aside to a
`.step-N.old-*` sibling before the new one is renamed in), so a save killed halfway leaves only a `.tmp` directory,
which `newest()` ignores, and a corrupt checkpoint is skipped (with a warning) for the previous one. At the start of a
run `recover_interrupted_saves` puts back a checkpoint left aside by a kill between the two renames and deletes
leftover `.tmp`/`.old-` directories (a full disk would otherwise stay full). A save that fails (e.g. no space left)
raises CheckpointError on every rank, naming the path, and deletes its `.tmp`: the previous checkpoints are untouched.
Collective: every rank calls save/newest. Never imports colossalai: optimizer state arrives as plain state objects.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import zlib

import torch
import torch.distributed as dist

from openmoe.config import OpenMoeConfig
from openmoe.io.hf import fsync_dir, fsync_tree, replace_directory, write_checkpoint

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


def _tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(path) for f in names)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (the message names the path and the cause); raised on every rank."""


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
        dirs = [os.path.join(self.root, d) for d in sorted(os.listdir(self.root)) if re.fullmatch(r"step-\d+", d)]
        return [d for d in dirs if os.path.isfile(os.path.join(d, MANIFEST))]

    def save(self, step: int, *, config: OpenMoeConfig, model_state: dict[str, torch.Tensor] | None,
             shared: dict[str, object], per_rank: dict[str, object], trainer_state: dict) -> str:
        """Collective. model_state: the full single-device state dict on rank 0 (None elsewhere); shared: state
        objects identical on every rank (written by rank 0; None values skipped); per_rank: this rank's own.
        Raises CheckpointError on every rank when any rank's write fails; the other checkpoints stay as they were."""
        rank, final = dist.get_rank(), self.path(step)
        tmp = final + ".tmp"
        error = None
        if rank == 0:
            error = self._attempt(final, lambda: (shutil.rmtree(tmp, ignore_errors=True), os.makedirs(tmp)))
        self._raise_any(error, tmp)

        def write():
            if rank == 0:
                write_checkpoint(os.path.join(tmp, MODEL_DIR), config, model_state)
                for name, state in shared.items():
                    if state is not None:
                        torch.save(state, os.path.join(tmp, f"{name}.pt"))
            for name, state in per_rank.items():
                torch.save(state, os.path.join(tmp, rank_file(name, rank)))

        self._raise_any(self._attempt(final, write), tmp)
        if rank == 0:
            state = {"step": step, "world_size": dist.get_world_size(), **trainer_state}
            error = self._attempt(final, lambda: self._commit(tmp, final, state))
        self._raise_any(error, tmp)
        return final

    def _attempt(self, final: str, fn) -> str | None:
        """Run fn; None, or the one-line reason it failed writing `final`."""
        try:
            fn()
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError from its zip writer
            return self._describe_failure(final, e)
        return None

    def _describe_failure(self, final: str, e: Exception) -> str:
        free = shutil.disk_usage(self.root).free if os.path.isdir(self.root) else 0
        done = self.complete()
        need = _tree_bytes(done[-1]) if done else 0  # the previous checkpoint's size: what this one needs
        full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) or (need and free < need)
        if full:
            free += _tree_bytes(final + ".tmp")  # what is free once the partial save is deleted (by _raise_any)
            size = f"; a checkpoint needs about {need / 2**20:.1f} MiB" if need else ""
            return (f"no space left on the device writing checkpoint {final} ({free / 2**20:.1f} MiB free without "
                    f"it{size}); the earlier checkpoints under {self.root} are intact: free space, then rerun with "
                    "--resume")
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        return f"writing checkpoint {final} failed: {reason}; the earlier checkpoints under {self.root} are intact"

    @staticmethod
    def _raise_any(error: str | None, tmp: str) -> None:
        """Collective: every rank raises the first rank's error (after rank 0 deletes the partial `tmp`)."""
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            if dist.get_rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(first)

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
        self.rotate(keep=final)

    def rotate(self, keep: str) -> None:
        """Delete all but `keep` (the checkpoint just written) and the newest keep_last - 1 complete ones before it.
        Checkpoints with a higher step than `keep` are a resumed run's abandoned future (newest() found them
        unusable): they go too, so that they never outrank the run's own newest checkpoint."""
        before = [d for d in self.complete() if d < keep]  # zero-padded step numbers: name order is step order
        kept = set(before[-(self.keep_last - 1):] if self.keep_last > 1 else []) | {keep}
        for old in self.complete():
            if old not in kept:
                shutil.rmtree(old, ignore_errors=True)

    def newest(self) -> str | None:
        """Collective. Rank 0 checks the complete checkpoints newest first and falls back past corrupt ones with a
        warning; once a usable one is found, each corrupt one is set aside as STEP.unusable (kept for inspection;
        complete() and so rotation no longer count it: it can neither outlive the good checkpoints it would otherwise
        displace nor collide with the resumed run's own save of that step). The choice is broadcast so that every
        rank loads the same one."""
        candidates = self.complete()[::-1]
        choice = [None]
        if dist.get_rank() == 0:
            bad = []
            for path in candidates:
                problem = verify_checkpoint(path)
                if problem is None:
                    choice[0] = path
                    break
                bad.append(path)
                print(f"warning: checkpoint {path} is unusable: {problem}; trying the previous one", file=sys.stderr,
                      flush=True)
            for path in bad if choice[0] else ():
                aside = _free_name(path + ".unusable")
                os.replace(path, aside)
                fsync_dir(self.root)
                print(f"warning: set {path} aside as {aside} (kept for inspection; neither resumed from nor rotated)",
                      file=sys.stderr, flush=True)
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


def _free_name(path: str) -> str:
    """path, or path.2, path.3, ... : the first that does not exist."""
    n, out = 1, path
    while os.path.exists(out):
        n += 1
        out = f"{path}.{n}"
    return out


def recover_interrupted_saves(output_path: str) -> list[str]:
    """Before a run touches `output_path` (under its lock): undo what a kill during a directory replacement left in
    it and in its `checkpoints/`. A kill between replace_directory's two renames leaves the old copy of NAME in
    `.NAME.old-*/x` and NAME missing: it is renamed back. Then every leftover `.tmp`/`.old-` directory (a save that
    never finished; it may be what filled the disk) is deleted. Returns one message per action."""
    notes = []
    for parent in (output_path, os.path.join(output_path, "checkpoints")):
        if not os.path.isdir(parent):
            continue
        for entry in sorted(os.listdir(parent)):
            full = os.path.join(parent, entry)
            old = re.fullmatch(r"\.(.+)\.old-[^/]+", entry)
            if old and os.path.isdir(full):
                target = os.path.join(parent, old.group(1))
                if not os.path.exists(target) and os.path.isdir(os.path.join(full, "x")):
                    os.replace(os.path.join(full, "x"), target)
                    fsync_dir(parent)
                    notes.append(f"note: restored {target}, set aside by a replacement that was interrupted")
                shutil.rmtree(full, ignore_errors=True)
            elif os.path.isdir(full) and (entry.endswith(".tmp") or re.fullmatch(r"\..+\.tmp-[^/]+", entry)):
                shutil.rmtree(full, ignore_errors=True)
                notes.append(f"note: removed {full}, left by a save that did not finish")
    return notes
