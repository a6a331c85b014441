"""Reliability through the real launcher: corrupt checkpoints are detected and skipped on resume; non-finite
steps are skipped and a run with too many in a row stops cleanly, leaving the last good checkpoint untouched; fp16
overflow steps are skipped visibly; an output directory belongs to one run; resume reports and applies changed flags;
SIGTERM to the launcher (openmoe.launch, as train.sh runs it) saves, exits non-zero, leaves nothing running, and the
resumed run continues bitwise; the launch never prints a planted secret."""

import json
import math
import os
import shutil
import signal
import subprocess
import time

import pytest

from openmoe.io.resumable import verify_checkpoint
from tests.helpers import BIN, ROOT, colossalai_run, free_port, metrics
from tests.parallel.test_train_cli import COMMON

KILL_ARGS = ["--max_steps", "10", "--save_interval", "2", "--keep_last", "5", *COMMON]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The 10-step run that the interrupted runs below must reproduce."""
    full = tmp_path_factory.mktemp("uninterrupted") / "full"
    res = colossalai_run(2, *KILL_ARGS, "--output_path", str(full))
    assert "done: 10 steps" in res.stdout + res.stderr
    return full


def launcher(*args: str, env: dict | None = None) -> subprocess.Popen:
    """train.py through `python -m openmoe.launch` (what train.sh runs) in its own session, output captured."""
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"], OMP_NUM_THREADS="1", **(env or {}))
    cmd = [os.path.join(BIN, "python"), "-m", "openmoe.launch", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "train.py", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def processes_mentioning(text: str) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in ps if text in line and "ps -eo" not in line]


def test_corrupt_checkpoint_is_detected_and_resume_falls_back(tmp_path):
    out = tmp_path / "run"
    args = ["--max_steps", "4", "--save_interval", "2", "--keep_last", "3", *COMMON]
    res = colossalai_run(2, *args, "--output_path", str(out))
    assert "done: 4 steps" in res.stdout + res.stderr, (res.stdout + res.stderr)[-3000:]
    full = metrics(out)
    newest = out / "checkpoints" / "step-00000004"
    assert verify_checkpoint(str(newest)) is None
    victim = newest / "optimizer-rank00001.pt"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # a save cut short by a full disk
    assert "optimizer-rank00001.pt has" in verify_checkpoint(str(newest))
    victim.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    assert "fails its CRC-32 check" in verify_checkpoint(str(newest))
    shutil.rmtree(out / "hf")
    (out / "metrics.jsonl").write_text("".join(open(out / "metrics.jsonl").readlines()[:2]))
    res = colossalai_run(2, *args, "--output_path", str(out), "--resume")
    log = res.stdout + res.stderr
    assert "checkpoint" in log and "step-00000004 is unusable" in log and "CRC-32" in log, log[-3000:]
    assert "step-00000002 at step 2" in log and "done: 4 steps" in log
    assert [r["loss"] for r in metrics(out)[2:]] == [r["loss"] for r in full[2:]]
    # the corrupt checkpoint is kept aside, out of rotation: the resumed run's own step 4 and the good step 2 remain
    assert f"warning: set {newest} aside as {newest}.unusable" in log
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000002", "step-00000004", "step-00000004.unusable"]
    assert verify_checkpoint(str(newest)) is None


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path):
    env = {"OPENMOE_FAULT_NAN_STEPS": "3,4"}
    out = tmp_path / "skip"
    res = colossalai_run(2, "--max_steps", "6", "--max_bad_steps", "3", "--output_path", str(out), *COMMON, env=env)
    log = res.stdout + res.stderr
    assert "done: 6 steps" in log and "step 3: non-finite loss or gradient; step skipped (1 in a row)" in log, \
        log[-3000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 5, 6] and all(math.isfinite(r["loss"]) for r in rows)
    # a NaN gradient with a finite loss (bf16): skipped too, and the weights stay finite
    out = tmp_path / "grad"
    res = colossalai_run(2, "--max_steps", "4", "--output_path", str(out), *COMMON,
                         env={"OPENMOE_FAULT_NAN_GRAD_STEPS": "2"})
    log = res.stdout + res.stderr
    assert "done: 4 steps" in log and "step 2: non-finite loss or gradient" in log, log[-3000:]
    from openmoe import OpenMoeForCausalLM

    model = OpenMoeForCausalLM.from_pretrained(str(out / "hf"))
    assert all(p.isfinite().all() for p in model.parameters())
    out = tmp_path / "stop"
    env = {"OPENMOE_FAULT_NAN_STEPS": "3,4,5"}
    res = colossalai_run(2, "--max_steps", "8", "--save_interval", "2", "--max_bad_steps", "3",
                         "--output_path", str(out), *COMMON, env=env)
    log = res.stdout + res.stderr
    assert "error: stopping: 3 consecutive steps with a non-finite loss (--max_bad_steps 3)" in log, log[-3000:]
    assert "127.0.0.1: failure" in log
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000002"]
    assert verify_checkpoint(str(out / "checkpoints" / "step-00000002")) is None


def test_kill_9_mid_run_then_resume_matches_uninterrupted(tmp_path, uninterrupted):
    """SIGKILL the whole job (launcher and ranks) once checkpoints exist; a fake half-written save is left too.
    Resume must pick the newest complete checkpoint and reproduce the uninterrupted losses bitwise."""
    args = KILL_ARGS
    full = uninterrupted
    out = tmp_path / "killed"
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"], OMP_NUM_THREADS="1",
               OPENMOE_FAULT_SLOW_STEP_S="0.5")  # slow steps down so the kill lands mid-run
    proc = subprocess.Popen([os.path.join(BIN, "colossalai"), "run", "--nproc_per_node", "2", "--master_port",
                             str(free_port()), "train.py", *args, "--output_path", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step-00000004" / "manifest.json").exists():
        assert time.time() < deadline and proc.poll() is None, "run ended before its step-4 checkpoint"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher, torchrun and every rank: nothing gets to clean up
    proc.wait()
    subprocess.run(["pkill", "-9", "-f", str(out)], check=False)
    (out / "checkpoints" / "step-00000006.tmp").mkdir(exist_ok=True)  # as if killed during the next save
    (out / "checkpoints" / "step-00000006.tmp" / "optimizer-rank00000.pt").write_bytes(b"partial")
    done = sorted(d for d in os.listdir(out / "checkpoints") if not d.endswith(".tmp"))
    assert done and all(verify_checkpoint(str(out / "checkpoints" / d)) is None for d in done)
    res = colossalai_run(2, *args, "--output_path", str(out), "--resume")
    log = res.stdout + res.stderr
    assert "done: 10 steps" in log, log[-3000:]
    start = int(log.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert start >= 4
    resumed = {r["step"]: r["loss"] for r in metrics(out)}
    assert [resumed[s] for s in range(start + 1, 11)] == [r["loss"] for r in metrics(full)[start:]]
    # the killed attempt's records after the resumed step were dropped: each step once
    assert [r["step"] for r in metrics(out)] == list(range(1, 11))


def test_sigterm_to_the_launcher_saves_stops_everything_and_resumes_bitwise(tmp_path, uninterrupted):
    """SIGTERM to `python -m openmoe.launch` (a scheduler preempting train.sh): every rank finishes its step and
    saves it, the job exits non-zero well within --preempt_grace_s, no process is left, and --resume reproduces the
    uninterrupted losses bitwise. A planted HF_TOKEN never reaches the output of this failing launch (colossalai run
    prints every environment variable when a node fails)."""
    out, secret = tmp_path / "preempted", "hf_PLANTEDsecretVALUE42"
    proc = launcher(*KILL_ARGS, "--output_path", str(out), "--preempt_grace_s", "60",
                    env={"OPENMOE_FAULT_SLOW_STEP_S": "0.5", "HF_TOKEN": secret, "OPENMOE_DEBUG": "1"})
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
        assert time.time() < deadline and proc.poll() is None, "run ended before step 3"
        time.sleep(0.2)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143 and time.time() - t0 < 60, (proc.returncode, log[-3000:])
    assert not processes_mentioning(str(out)), processes_mentioning(str(out))
    step = int(log.split("[rank 0] preempted (SIGTERM): saved ")[1].split(" at step ")[1].split(";")[0])
    assert 3 <= step < 10 and f"[rank 1] preempted (SIGTERM): saved {out}/checkpoints/step-{step:08d}" in log
    assert verify_checkpoint(str(out / "checkpoints" / f"step-{step:08d}")) is None
    # OPENMOE_DEBUG=1 keeps colossalai run's failure block, whose command line exported every variable: redacted
    assert "127.0.0.1: failure" in log and "export <" in log and secret not in log
    res = colossalai_run(2, *KILL_ARGS, "--output_path", str(out), "--resume")
    log = res.stdout + res.stderr
    assert f"step-{step:08d} at step {step}" in log and "done: 10 steps" in log, log[-3000:]
    resumed = {r["step"]: r["loss"] for r in metrics(out)}
    assert [resumed[s] for s in range(step + 1, 11)] == [r["loss"] for r in metrics(uninterrupted)[step:]]


def test_output_directory_belongs_to_one_run_and_resume_is_honest(tmp_path):
    from openmoe.train.builder import lr_lambda
    from openmoe.train.config import RunConfig
    from openmoe.train.lock import OutputLock

    out = tmp_path / "run"
    args = [*COMMON, "--output_path", str(out)]
    res = colossalai_run(2, *args, "--max_steps", "2")
    assert "done: 2 steps" in res.stdout + res.stderr
    # a new run (no --resume) over the old one's checkpoints: refused, nothing touched
    res = colossalai_run(2, *args, "--max_steps", "4", "--save_interval", "1")
    assert (f"[rank 0] error: --output_path {out} holds 1 checkpoint(s) of an earlier run (newest step-00000002); "
            "continue it with --resume, replace it with --overwrite, or choose another --output_path") in res.stderr
    assert "127.0.0.1: failure" in res.stdout and sorted(os.listdir(out / "checkpoints")) == ["step-00000002"]
    # --overwrite with a mistyped dataset: the new run fails its checks before the old run is removed
    res = colossalai_run(2, *args, "--max_steps", "4", "--overwrite", "--dataset", str(tmp_path / "trian.jsonl"))
    assert f"error: dataset file {tmp_path}/trian.jsonl does not exist" in res.stderr, res.stderr[-3000:]
    assert "--overwrite: removed" not in res.stdout + res.stderr
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000002"] and (out / "metrics.jsonl").exists()
    # a live run holds the directory (here: this test process holds its lock)
    lock = OutputLock(str(out))
    lock.acquire()
    res = colossalai_run(2, *args, "--max_steps", "4", "--resume")
    lock.release()
    assert (f"error: --output_path {out} is in use by another run (host " in res.stderr
            and f", pid {os.getpid()}, started " in res.stderr), res.stderr[-3000:]
    # a stale lock (its holder died) is taken over; --max_steps below the checkpoint is refused
    (out / ".lock").write_text(json.dumps({"host": "gone", "pid": 999999999, "started": "earlier"}))
    res = colossalai_run(2, *args, "--max_steps", "1", "--resume")
    assert "took over the stale lock" in res.stdout and "(host gone, pid 999999999, started earlier)" in res.stdout
    assert (f"error: --resume: checkpoint {out}/checkpoints/step-00000002 is at step 2, beyond --max_steps 1; "
            "accepted: --max_steps >= 2") in res.stderr, res.stderr[-3000:]
    assert not (out / ".lock").exists()
    # changed flags on --resume: listed and applied (the new LR from step 3 on, in the rebuilt schedule)
    res = colossalai_run(2, *args, "--max_steps", "4", "--resume", "--lr", "1e-3")
    log = res.stdout + res.stderr
    assert ("--resume: options changed since the checkpoint, applied from step 3: --max_steps 2 -> 4; --lr 0.003 -> "
            "0.001") in log and "done: 4 steps" in log, log[-3000:]
    f = lr_lambda(RunConfig.from_flat(warmup_steps=2, lr=1e-3), 4)
    assert [(r["step"], r["lr"]) for r in metrics(out)[2:]] == [(3, 1e-3 * f(3)), (4, 1e-3 * f(4))]


def test_fp16_overflow_steps_are_skipped_visibly_and_max_bad_steps_fires(tmp_path):
    """fp16 + NaN gradients (finite loss): ColossalAI's loss scaler skips those updates silently; here each is
    reported, the LR schedule does not advance on it, the loss scale is in the metrics, and once the scale is at its
    minimum --max_bad_steps stops the run."""
    from openmoe.train.builder import lr_lambda
    from openmoe.train.config import RunConfig

    out = tmp_path / "fp16"
    bad = "3,4," + ",".join(str(s) for s in range(8, 41))
    res = colossalai_run(2, *COMMON, "--precision", "fp16", "--max_steps", "40", "--max_bad_steps", "2",
                         "--output_path", str(out), env={"OPENMOE_FAULT_NAN_GRAD_STEPS": bad})
    log = res.stdout + res.stderr
    assert ("warning: step 3: fp16 gradient overflow, loss scale now 65536; step skipped (1 skipped in this run; "
            "overflows count toward --max_bad_steps once the scale is at its minimum)") in log, log[-3000:]
    assert "step 4: fp16 gradient overflow, loss scale now 32768" in log
    assert "step 22: fp16 gradient overflow at the minimum loss scale 1; step skipped (1 in a row)" in log
    assert ("error: stopping: 2 consecutive steps with a non-finite loss or fp16 gradient overflow (--max_bad_steps "
            "2)") in log and "127.0.0.1: failure" in log
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 5, 6, 7]
    f = lr_lambda(RunConfig.from_flat(warmup_steps=2, lr=3e-3, max_steps=40), 40)
    assert [r["lr"] for r in rows] == [3e-3 * f(n) for n in range(1, 6)]  # the schedule counts applied steps only
    assert [r["skipped_steps"] for r in rows] == [0, 0, 2, 2, 2]
    assert [r["loss_scale"] for r in rows] == [65536.0, 65536.0, 32768.0, 32768.0, 32768.0]


def test_a_dying_rank_ends_the_job_quickly_and_names_itself(tmp_path):
    import time

    t0 = time.time()
    res = colossalai_run(2, "--max_steps", "20", "--output_path", str(tmp_path / "die"), *COMMON,
                         env={"OPENMOE_FAULT_RAISE_AT": "1:3"})
    log = res.stdout + res.stderr
    assert "127.0.0.1: failure" in log and "injected failure on rank 1 at step 3" in log, log[-3000:]
    assert time.time() - t0 < 120  # the other rank is stopped by the launcher, not left waiting in a collective


def test_a_rank_that_hangs_alive_ends_the_job_within_dist_timeout(tmp_path):
    t0 = time.time()
    # --preempt_grace_s 5: the hung rank ignores torchrun's SIGTERM (it cannot finish its step) for 5 s, not 30
    res = colossalai_run(2, "--max_steps", "6", "--dist_timeout", "10", "--preempt_grace_s", "5", "--output_path",
                         str(tmp_path / "hang"), *COMMON, env={"OPENMOE_FAULT_HANG_AT": "1:3"})
    log = res.stdout + res.stderr
    assert ("[rank 0] error: a collective timed out (--dist_timeout): another rank hangs or died; " in log
            and "Timed out waiting 10000ms" in log and "127.0.0.1: failure" in log), log[-3000:]
    assert "[rank 1] preempted (SIGTERM): no checkpoint within --preempt_grace_s 5; exiting without one" in log
    assert time.time() - t0 < 90  # without the timeout gloo waits 30 minutes


def test_sigint_to_one_rank_stops_every_rank_with_a_checkpoint(tmp_path):
    """A signal to any single rank (here SIGINT to rank 1 alone) stops all ranks after the same step, saved."""
    out = tmp_path / "one"
    proc = launcher("--max_steps", "30", "--output_path", str(out), *COMMON, env={"OPENMOE_FAULT_SLOW_STEP_S": "0.3"})
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
        assert time.time() < deadline and proc.poll() is None, "run ended before step 2"
        time.sleep(0.2)
    import psutil

    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "train.py" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"]
    assert len(ranks) == 1
    ranks[0].send_signal(signal.SIGINT)
    log = proc.communicate(timeout=120)[0]
    step = int(log.split("[rank 0] preempted (SIGINT): saved ")[1].split(" at step ")[1].split(";")[0])
    assert f"[rank 1] preempted (SIGINT): saved {out}/checkpoints/step-{step:08d} at step {step}" in log, log[-3000:]
    assert proc.returncode != 0 and verify_checkpoint(str(out / "checkpoints" / f"step-{step:08d}")) is None
    assert not processes_mentioning(str(out))
    # the launcher's summary lines replace torchrun's traceback wall and colossalai run's failure block
    assert "torchrun: rank " in log and "exit code 130" in log and "ChildFailedError" not in log, log[-3000:]
    assert "colossalai run: node 127.0.0.1 failed" in log and "Stdout: already printed" not in log


def test_full_disk_during_a_save_is_one_line_and_resume_works_after_space_returns(tmp_path):
    """The output directory on a 20 MiB tmpfs: checkpoints of steps 2 and 4 fit (about 8 MiB each), step 6 does not.
    The run stops with one line naming the path on every rank, leaves no partial directory, keeps step 4 usable, and
    once the filesystem is grown, --resume continues from step 4."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        out = disk / "run"
        args = ["--max_steps", "8", "--save_interval", "2", "--keep_last", "2", *COMMON, "--output_path", str(out)]
        res = colossalai_run(2, *args)
        log = res.stdout + res.stderr
        for rank in (0, 1):
            assert (f"[rank {rank}] error: no space left on the device writing checkpoint {out}/checkpoints/"
                    "step-00000006 (") in log, log[-3000:]
        assert "a checkpoint needs about" in log and "are intact: free space, then rerun with --resume" in log
        assert sorted(os.listdir(out / "checkpoints")) == ["step-00000002", "step-00000004"]
        assert verify_checkpoint(str(out / "checkpoints" / "step-00000004")) is None
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space returns
        res = colossalai_run(2, *args, "--resume")
        log = res.stdout + res.stderr
        assert "step-00000004 at step 4" in log and "done: 8 steps" in log, log[-3000:]
    finally:
        subprocess.run(["umount", str(disk)], check=False)
