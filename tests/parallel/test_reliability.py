"""Reliability through the real launcher: corrupt checkpoints are detected and skipped on resume; non-finite
steps are skipped and a run with too many in a row stops cleanly, leaving the last good checkpoint untouched."""

import math
import os
import shutil

from tests.parallel.test_train_cli import COMMON, colossalai_run, metrics
from openmoe.trainer import verify_checkpoint


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


def test_kill_9_mid_run_then_resume_matches_uninterrupted(tmp_path):
    """SIGKILL the whole job (launcher and ranks) once checkpoints exist; a fake half-written save is left too.
    Resume must pick the newest complete checkpoint and reproduce the uninterrupted losses bitwise."""
    import signal
    import subprocess
    import sys
    import time

    from tests.parallel.dist_utils import free_port
    from tests.parallel.test_train_cli import BIN, ROOT

    args = ["--max_steps", "10", "--save_interval", "2", "--keep_last", "5", *COMMON]
    full = tmp_path / "full"
    res = colossalai_run(2, *args, "--output_path", str(full))
    assert "done: 10 steps" in res.stdout + res.stderr
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


def test_a_dying_rank_ends_the_job_quickly_and_names_itself(tmp_path):
    import time

    t0 = time.time()
    res = colossalai_run(2, "--max_steps", "20", "--output_path", str(tmp_path / "die"), *COMMON,
                         env={"OPENMOE_FAULT_RAISE_AT": "1:3"})
    log = res.stdout + res.stderr
    assert "127.0.0.1: failure" in log and "injected failure on rank 1 at step 3" in log, log[-3000:]
    assert time.time() - t0 < 120  # the other rank is stopped by the launcher, not left waiting in a collective
