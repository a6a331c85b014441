"""Resume onto another parallel layout through the real launcher: model, fp32 masters, Adam moments, LR schedule and
data position carry over. One 2-rank `ep` run (6 steps, checkpoints at 2, 4, 6) is the reference:

  2 -> 4 ranks (ep, EP 4)          from its step-2 checkpoint, steps 3-4
  4 -> 2 ranks (ep, EP 2)          from that resumed run's step-4 checkpoint, steps 5-6
  ep -> hybrid (pp 2 x ep 2, 4)    from its step-2 checkpoint, steps 3-4

The global batch stays 8 rows (--batch_size scaled with the data-parallel size), the LR constant (a shorter
--max_steps would otherwise reshape the cosine schedule), rows are packed (no padding, so a
mean over ranks of per-rank means is the global mean) and routing is dropless (capacity does not depend on how many
tokens a rank holds). The losses then agree up to the order of bf16/fp32 reductions; the second resumed step also
shows that the Adam moments came back (with the moments left at zero, step 4's loss was 1.6% off: 8x the tolerance).
"""

import shutil

from tests.helpers import colossalai_run, metrics

COMMON = ["--no-tensorboard", "--max_length", "48", "--pack", "--dropless", "--warmup_steps", "1", "--lr", "5e-3",
          "--lr_schedule", "constant",
          "--keep_last", "10", "--save_interval", "2"]


def run(nproc: int, out, *args: str) -> str:
    res = colossalai_run(nproc, *args, *COMMON, "--output_path", str(out), timeout=420)
    log = res.stdout + res.stderr
    assert res.returncode == 0 and "127.0.0.1: success" in log, log[-4000:]
    return log


def keep_through(src, dst, step: int) -> None:
    """dst = src as if stopped right after its step-`step` checkpoint."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    for ckpt in (dst / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    shutil.rmtree(dst / "hf", ignore_errors=True)
    lines = (dst / "metrics.jsonl").read_text().splitlines()[:step]
    (dst / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def close(ref: dict, got: dict, rel: float = 2e-3) -> None:
    assert abs(ref["loss"] - got["loss"]) <= rel * abs(ref["loss"]), (ref["step"], ref["loss"], got["loss"])


def test_resume_onto_other_world_sizes_and_plugins(tmp_path):
    full, wide, narrow, hybrid = (tmp_path / n for n in ("full", "wide", "narrow", "hybrid"))
    run(2, full, "--plugin", "ep", "--batch_size", "4", "--max_steps", "6")
    ref = metrics(full)

    keep_through(full, wide, 2)
    log = run(4, wide, "--plugin", "ep", "--batch_size", "2", "--max_steps", "4", "--resume")
    assert "resharded" in log and "written by 2 ranks, loaded onto 4" in log, log[-3000:]
    got = metrics(wide)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for step in (3, 4):
        close(ref[step - 1], got[step - 1])

    keep_through(wide, narrow, 4)
    log = run(2, narrow, "--plugin", "ep", "--batch_size", "4", "--max_steps", "6", "--resume")
    assert "written by 4 ranks, loaded onto 2" in log, log[-3000:]
    got = metrics(narrow)
    for step in (5, 6):
        close(ref[step - 1], got[step - 1])

    keep_through(full, hybrid, 2)
    log = run(4, hybrid, "--plugin", "hybrid", "--pp_size", "2", "--ep_size", "2", "--microbatch_size", "2",
              "--batch_size", "4", "--max_steps", "4", "--resume")
    assert "written by 2 ranks, loaded onto 4" in log, log[-3000:]
    got = metrics(hybrid)
    for step in (3, 4):
        close(ref[step - 1], got[step - 1])
