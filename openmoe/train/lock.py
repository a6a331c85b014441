"""Output-directory ownership: one run at a time per --output_path, and a new run never mixes with an old one.

`claim_output_dir(run)` (collective, before anything is written) makes rank 0:
  1. take OUTPUT/.lock: an exclusive flock held for the whole run, the file naming the holder's host, pid and start
     time. The kernel drops a flock when its holder dies, even by SIGKILL, so a lock file left by a dead run is taken
     over (with a message naming the old holder) while a live holder refuses the new run with one line. Linux
     emulates flock with POSIX locks on NFS, which NFSv4 servers honour across hosts;
  2. finish or undo interrupted checkpoint replacements (io/resumable.recover_interrupted_saves);
  3. refuse a new run (no --resume) in a directory that holds checkpoints, unless --overwrite, which removes the old
     run's checkpoints, export and metrics (otherwise rotation, which keeps the highest step numbers, would delete
     the new run's checkpoints and a later --resume would continue the old run); also refuse --overwrite when an
     input of the new run (--pretrained, --tokenizer, --model_name) lies inside what it would remove.
Every rank raises the same one-line error. The removal itself is `remove_earlier_run` (collective), which train.py
calls only once the new run is built: data, tokenizer, model and layout all checked, so a mistyped option never
costs the old run.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket

import torch.distributed as dist

from openmoe.io.hf import path_within
from openmoe.io.resumable import CheckpointManager, recover_interrupted_saves

LOCK_FILE = ".lock"


class OutputLock:
    """An exclusive flock on DIRECTORY/.lock, with the holder's host/pid/start time written into the file."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK_FILE)
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock (its holder dead) was taken over. Raises ValueError naming
        the live holder."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(_read(fd))
                os.close(fd)
                raise ValueError(f"--output_path {os.path.dirname(self.path)} is in use by another run ({holder}); "
                                 "wait for it to finish, stop it, or choose another --output_path") from None
            # the holder we waited on may have unlinked the file between our open and our flock: lock the file that
            # is there now
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
                                 ).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        if previous:
            return (f"note: took over the stale lock {self.path} of a run that is no longer running "
                    f"({_describe(previous)})")
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.unlink(self.path)  # before unlocking: a waiter that opened the old file re-checks the inode
            os.close(self.fd)
            self.fd = None


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"


def claim_output_dir(output_path: str, *, resume: bool, overwrite: bool,
                     inputs: dict[str, str | None] | None = None) -> OutputLock | None:
    """Collective. Rank 0 locks the directory, recovers interrupted saves and checks that a new run does not land on
    an old one (inputs: option -> path the new run reads, refused inside what --overwrite removes); returns the lock
    on rank 0 (release it at the end), None elsewhere. Same ValueError on every rank. Nothing is removed here."""
    lock, error = None, None
    if dist.get_rank() == 0:
        try:
            lock = _claim(output_path, resume, overwrite, inputs or {})
        except ValueError as e:
            error = str(e)
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise ValueError(box[0])
    return lock


def _claim(output_path: str, resume: bool, overwrite: bool, inputs: dict[str, str | None]) -> OutputLock:
    if os.path.exists(output_path) and not os.path.isdir(output_path):
        raise ValueError(f"--output_path {output_path} is a file; expected a directory (new or of an earlier run)")
    try:
        os.makedirs(output_path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--output_path {output_path} is not writable: {e.strerror}") from None
    lock = OutputLock(output_path)
    try:
        for note in [lock.acquire(), *recover_interrupted_saves(output_path)]:
            if note:
                print(note, flush=True)
        _check_new_run(output_path, resume, overwrite, inputs)
    except BaseException:
        lock.release()
        raise
    return lock


# what a run leaves in its output directory (besides the lock): removed by --overwrite
RUN_OUTPUTS = ("checkpoints", "hf", "adapter", "adapters", "metrics.jsonl", "tensorboard")  # adapter(s): --lora_rank


def _check_new_run(output_path: str, resume: bool, overwrite: bool, inputs: dict[str, str | None]) -> None:
    saved = _earlier_run(output_path, resume)
    if not saved:
        return
    if not overwrite:
        raise ValueError(f"--output_path {output_path} holds {len(saved)} checkpoint(s) of an earlier run (newest "
                         f"{os.path.basename(saved[-1])}); continue it with --resume, replace it with --overwrite, or "
                         "choose another --output_path")
    for option, path in inputs.items():
        if path and os.path.exists(path) and any(path_within(path, os.path.join(output_path, name))
                                                 for name in RUN_OUTPUTS):
            raise ValueError(f"{option} {path} lies inside the earlier run under --output_path {output_path}, which "
                             f"--overwrite would remove; copy it elsewhere first, or choose another --output_path")


def _earlier_run(output_path: str, resume: bool) -> list[str]:
    """The complete checkpoints of an earlier run that a new run (no --resume) would land on."""
    return [] if resume else CheckpointManager(os.path.join(output_path, "checkpoints"), 1).complete()


def remove_earlier_run(output_path: str, *, resume: bool, overwrite: bool) -> None:
    """Collective, after the new run is built (every input checked): with --overwrite, rank 0 removes the earlier
    run's checkpoints, export and metrics (claim_output_dir checked that nothing the new run reads is among them),
    and says what it removed."""
    if overwrite and dist.get_rank() == 0:
        saved = _earlier_run(output_path, resume)
        removed = []
        for name in RUN_OUTPUTS if saved else ():
            path = os.path.join(output_path, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
            else:
                continue
            removed.append(name)
        if removed:
            print(f"--overwrite: removed the earlier run's {', '.join(removed)} under {output_path} ({len(saved)} "
                  f"checkpoint(s), newest {os.path.basename(saved[-1])})", flush=True)
    dist.barrier()  # no rank writes into the directory before the removal is done
