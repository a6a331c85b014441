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
    assert "done: 6 steps" in log and "step 3: non-finite loss; step skipped (1 in a row)" in log, log[-3000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 5, 6] and all(math.isfinite(r["loss"]) for r in rows)
    out = tmp_path / "stop"
    env = {"OPENMOE_FAULT_NAN_STEPS": "3,4,5"}
    res = colossalai_run(2, "--max_steps", "8", "--save_interval", "2", "--max_bad_steps", "3",
                         "--output_path", str(out), *COMMON, env=env)
    log = res.stdout + res.stderr
    assert "error: stopping: 3 consecutive steps with a non-finite loss (--max_bad_steps 3)" in log, log[-3000:]
    assert "127.0.0.1: failure" in log
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000002"]
    assert verify_checkpoint(str(out / "checkpoints" / "step-00000002")) is None
