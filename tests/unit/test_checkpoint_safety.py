"""Checkpoint and output-directory safety in one process (a gloo world of 1): the lock, rotation, an interrupted
re-save, a full disk, and the resume flag checks. The same code paths run through the launcher in
tests/parallel/test_reliability.py."""

import errno
import json
import os
import shutil
import subprocess

import pytest
import torch
import torch.distributed as dist

from openmoe import OpenMoeForCausalLM, preset
from openmoe.io.resumable import CheckpointError, CheckpointManager, recover_interrupted_saves, verify_checkpoint
from openmoe.train.config import RunConfig
from openmoe.train.lock import OutputLock, claim_output_dir, remove_earlier_run
from tests.helpers import free_port


@pytest.fixture(scope="module")
def world1():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def model_state():
    torch.manual_seed(0)
    return OpenMoeForCausalLM(preset("tiny")).state_dict()


def save(mgr: CheckpointManager, step: int, model_state, ballast: int = 0) -> str:
    return mgr.save(step, config=preset("tiny"), model_state=model_state, shared={"scheduler": {"step": step}},
                    per_rank={"optimizer": {"ballast": torch.zeros(ballast, dtype=torch.uint8)}},
                    trainer_state={"data": None, "run": {}})


def test_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path, world1, capsys):
    first = OutputLock(str(tmp_path))
    assert first.acquire() is None
    with pytest.raises(ValueError, match=rf"--output_path {tmp_path} is in use by another run \(host \S+, pid "
                                         rf"{os.getpid()}, started .*\); wait for it"):
        OutputLock(str(tmp_path)).acquire()  # flock is per open file: a second open conflicts even in-process
    first.release()
    assert not (tmp_path / ".lock").exists()
    # a lock file whose holder died (SIGKILL leaves the file, the kernel drops the flock)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"host": "node7", "pid": dead.pid, "started": "yesterday"}))
    lock = claim_output_dir(str(tmp_path), resume=False, overwrite=False)
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert (f"note: took over the stale lock {tmp_path}/.lock of a run that is no longer running (host node7, pid "
            f"{dead.pid}, started yesterday)") in capsys.readouterr().out
    lock.release()


def test_lock_note_and_new_run_over_old_checkpoints(tmp_path, world1, model_state, capsys):
    mgr = CheckpointManager(str(tmp_path / "checkpoints"), 2)
    save(mgr, 120, model_state)
    (tmp_path / "metrics.jsonl").write_text('{"step": 120}\n')
    with pytest.raises(ValueError, match=rf"--output_path {tmp_path} holds 1 checkpoint\(s\) of an earlier run "
                                         r"\(newest step-00000120\); continue it with --resume, replace it with "
                                         r"--overwrite, or choose another --output_path"):
        claim_output_dir(str(tmp_path), resume=False, overwrite=False)
    assert not (tmp_path / ".lock").exists()  # a refused claim leaves no lock behind
    claim_output_dir(str(tmp_path), resume=True, overwrite=False).release()
    # --overwrite: the claim removes nothing (the new run's inputs are checked first); remove_earlier_run does
    model_dir = tmp_path / "checkpoints" / "step-00000120" / "model"
    with pytest.raises(ValueError, match=rf"^--pretrained {model_dir} lies inside the earlier run under --output_path "
                                         rf"{tmp_path}, which --overwrite would remove; copy it elsewhere first, or "
                                         r"choose another --output_path$"):
        claim_output_dir(str(tmp_path), resume=False, overwrite=True, inputs={"--pretrained": str(model_dir)})
    lock = claim_output_dir(str(tmp_path), resume=False, overwrite=True,
                            inputs={"--pretrained": None, "--tokenizer": str(tmp_path.parent)})
    assert (tmp_path / "checkpoints").exists() and (tmp_path / "metrics.jsonl").exists()
    remove_earlier_run(str(tmp_path), resume=False, overwrite=True)
    lock.release()
    assert "--overwrite: removed the earlier run's checkpoints, metrics.jsonl" in capsys.readouterr().out
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_output_path_that_is_a_file_is_refused(tmp_path, world1):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=rf"^--output_path {tmp_path}/afile is a file; expected a directory \(new or "
                                         r"of an earlier run\)$"):
        claim_output_dir(str(tmp_path / "afile"), resume=False, overwrite=False)


def test_keep_last_and_overwrite_options_are_validated():
    for bad in (0, -1):
        with pytest.raises(ValueError, match=rf"^--keep_last \({bad}\) must be >= 1$"):
            RunConfig.from_flat(keep_last=bad)
    with pytest.raises(ValueError, match="--overwrite deletes the checkpoints that --resume would continue"):
        RunConfig.from_flat(resume=True, overwrite=True)
    with pytest.raises(ValueError, match=r"--preempt_grace_s \(0.0\) must be > 0"):
        RunConfig.from_flat(preempt_grace_s=0)


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path, world1, model_state):
    mgr = CheckpointManager(str(tmp_path), 1)
    save(mgr, 180, model_state)  # e.g. an abandoned future a resume fell back from
    save(mgr, 20, model_state)
    assert [os.path.basename(p) for p in mgr.complete()] == ["step-00000020"]
    mgr.keep_last = 2
    for step in (40, 60):
        save(mgr, step, model_state)
    assert [os.path.basename(p) for p in mgr.complete()] == ["step-00000040", "step-00000060"]


def test_kill_between_the_two_renames_of_a_resave_leaves_a_usable_checkpoint(tmp_path, world1, model_state,
                                                                             monkeypatch, capsys):
    mgr = CheckpointManager(str(tmp_path / "checkpoints"), 1)
    first = save(mgr, 4, model_state)
    before = (tmp_path / "checkpoints" / "step-00000004" / "scheduler.pt").read_bytes()

    class Killed(BaseException):
        pass

    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((str(src), str(dst)))
        if src == first + ".tmp":  # the old step-4 is aside, the new one not yet in: the process dies here
            raise Killed()
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        save(mgr, 4, model_state)
    monkeypatch.setattr(os, "replace", real)
    assert calls[-2][0] == first and ".step-00000004.old-" in calls[-2][1] and calls[-1] == (first + ".tmp", first)
    assert not os.path.exists(first) and mgr.newest() is None  # what a plain resume would see: "starting fresh"
    notes = recover_interrupted_saves(str(tmp_path))  # what the next run does first, under its lock
    assert any(f"restored {first}" in n for n in notes) and any("step-00000004.tmp" in n for n in notes)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000004"]  # no .tmp / .old- left
    assert verify_checkpoint(first) is None and mgr.newest() == first
    assert (tmp_path / "checkpoints" / "step-00000004" / "scheduler.pt").read_bytes() == before


def _small_tmpfs(path, size: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, world1, model_state,
                                                                                 monkeypatch):
    disk = tmp_path / "disk"
    mounted = _small_tmpfs(disk, "8m")
    try:
        mgr = CheckpointManager(str(disk / "checkpoints"), 2)
        previous = save(mgr, 2, model_state)
        if mounted:  # a real full disk: the optimizer file does not fit
            ballast = 6 << 20
        else:  # no root for a tmpfs: simulate ENOSPC in the writer instead
            ballast, real = 0, torch.save

            def full(obj, f, *a, **k):
                if "optimizer" in str(f):
                    raise OSError(errno.ENOSPC, "No space left on device", str(f))
                return real(obj, f, *a, **k)

            monkeypatch.setattr(torch, "save", full)
        with pytest.raises(CheckpointError) as e:
            save(mgr, 4, model_state, ballast=ballast)
        message = str(e.value)
        assert "\n" not in message and message.startswith(
            f"no space left on the device writing checkpoint {disk}/checkpoints/step-00000004 (")
        assert "MiB free without it; a checkpoint needs about" in message and "are intact" in message
        if mounted:  # the free space it names is what is free once the partial save is gone
            named = float(message.split(" (")[1].split(" MiB free")[0])
            assert abs(named - shutil.disk_usage(disk).free / 2**20) < 0.2, (named, message)
        assert sorted(os.listdir(disk / "checkpoints")) == ["step-00000002"]  # the partial .tmp is gone
        assert verify_checkpoint(previous) is None and mgr.newest() == previous
        monkeypatch.undo()
        save(mgr, 4, model_state)  # space is back
        assert mgr.newest().endswith("step-00000004")
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)


def test_resume_lists_changed_options_and_refuses_layout_and_architecture_changes():
    from openmoe.train.checkpointing import changed_options, check_architecture

    saved = RunConfig.from_flat(lr=3e-3, max_steps=6).to_dict()
    now = RunConfig.from_flat(lr=1e-3, max_steps=12, resume=True, output_path="elsewhere")
    assert changed_options(saved, now, "ck/step-6") == ["--max_steps 6 -> 12", "--lr 0.003 -> 0.001"]
    for flags, shown in [({"freeze_router": True}, "--freeze_router False; this run asks for --freeze_router True"),
                         ({"precision": "fp16", "trainable": "router"},
                          "--trainable all, --precision bf16; this run asks for --trainable router, --precision fp16")]:
        with pytest.raises(ValueError, match=rf"^--resume: checkpoint ck/step-6 was trained with {shown}, which a "
                                             r"resume cannot change .* --pretrained ck/step-6/model$"):
            changed_options(saved, RunConfig.from_flat(max_steps=6, lr=3e-3, **flags), "ck/step-6")
    check_architecture(preset("tiny"), preset("tiny").replace(z_loss_factor=0.5), "ck")  # a loss weight: fine
    with pytest.raises(ValueError, match=r"^--resume: checkpoint ck holds another architecture \(num_experts 4 -> "
                                         r"8\); resume with the checkpoint's --model_name/--pretrained"):
        check_architecture(preset("tiny").replace(num_experts=8), preset("tiny"), "ck")


def test_launcher_redacts_secret_values_and_the_export_list():
    from openmoe.launch import redact, secret_values

    env = {"HF_TOKEN": "hf_abcdef123", "WANDB_API_KEY": "wk-999999", "MY_PASSWORD": "hunter22", "PATH": "/usr/bin",
           "SHORT_KEY": "ab", "TOKENIZERS_PARALLELISM": "false", "USE_KEY": "true", "MONKEY_BUSINESS": "bananas"}
    secrets = secret_values(env)
    assert secrets == ["hf_abcdef123", "wk-999999", "hunter22"]  # not a name that merely contains TOKEN/KEY
    line = ('Command: \'cd /w && export PATH="/usr/bin" HF_TOKEN="hf_abcdef123" WANDB_API_KEY="wk-999999"  && '
            'torchrun x.py\' token hf_abcdef123 and hunter22 in a message; ab stays')
    out = redact(line, secrets)
    assert all(v not in out for v in ("hf_abcdef123", "wk-999999", "hunter22"))
    assert "export <3 environment variables> && torchrun x.py" in out and "ab stays" in out


def test_launcher_summarises_torchrun_and_colossalai_failure_blocks_in_one_line_each():
    from openmoe.launch import Summarizer

    rule = "=" * 60
    log = ["[rank 0] error: --lr 'x' is not a number", "Traceback (most recent call last):",
           '  File "/v/bin/torchrun", line 6, in <module>', '  File "/v/torch/distributed/run.py", line 1028, in main',
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ", rule, "train.py FAILED", "-" * 60,
           "Failures:", "[1]:", "  rank      : 1 (local_rank: 1)", "  exitcode  : 2 (pid: 11) ", "-" * 60,
           "Root Cause (first observed failure):", "[0]:", "  rank      : 0 (local_rank: 0)",
           "  exitcode  : 2 (pid: 10) ", rule,
           "Error: failed to run torchrun train.py on 127.0.0.1, is localhost: True, exception: Encountered a bad "
           "command exit code!", "", "Command: 'cd /w && export <40 environment variables> && torchrun'", "",
           "Exit code: 1", "", "Stdout: already printed", "", "Stderr: already printed", "",
           "127.0.0.1: failure",
           "Traceback (most recent call last):", '  File "train.py", line 3, in <module>', "KeyError: 'x'"]
    s, out = Summarizer(), []
    for line in log:
        out += s.feed(line + "\n")
    out += s.flush()
    assert [line.rstrip("\n") for line in out] == [
        "[rank 0] error: --lr 'x' is not a number",
        "torchrun: rank 1 exit code 2, rank 0 exit code 2 (OPENMOE_DEBUG=1 shows torchrun's full report)",
        "colossalai run: node 127.0.0.1 failed (the ranks' errors are above)", "", "127.0.0.1: failure",
        "Traceback (most recent call last):", '  File "train.py", line 3, in <module>', "KeyError: 'x'"]


def test_launcher_drops_the_tracebacks_of_an_interrupted_startup(monkeypatch):
    """Ctrl-C while the ranks import torch: every rank's KeyboardInterrupt traceback (interleaved) and torchrun's
    report are dropped once the launcher has the signal; the ranks' own lines pass; before the signal, nothing is."""
    import io
    import threading

    from openmoe.launch import _pump

    monkeypatch.delenv("OPENMOE_DEBUG", raising=False)
    lines = ["[rank 0] preempted (SIGINT): saved /o/checkpoints/step-00000004 at step 4; resume with --resume",
             "Traceback (most recent call last):", "Traceback (most recent call last):",
             '  File "/v/transformers/utils/import_utils.py", line 1967, in _get_module', "KeyboardInterrupt    ",
             "    raise OptionalDependencyNotAvailable()", "transformers.utils.import_utils."
             "OptionalDependencyNotAvailable", "",
             "During handling of the above exception, another exception occurred:",
             "KeyboardInterrupt", "W1201 03:29:45.607000 16340 torch/distributed/elastic/multiprocessing/api.py:1028] "
             "Sending process 16347 closing signal SIGTERM", "=" * 55, "train.py FAILED", "-" * 55, "Failures:",
             "[1]:", "  rank      : 1 (local_rank: 1)", "Root Cause (first observed failure):", "127.0.0.1: failure"]
    text = "".join(line + "\n" for line in lines)

    def pumped(interrupted: bool) -> list[str]:
        event, out = threading.Event(), io.StringIO()
        if interrupted:
            event.set()
        _pump(io.StringIO(text), out, [], event)
        return out.getvalue().splitlines()

    assert pumped(True) == [lines[0], "127.0.0.1: failure"]
    assert "KeyboardInterrupt" in pumped(False) and len(pumped(False)) > 15


def test_metrics_reader_skips_a_torn_last_line_and_names_a_corrupt_one(tmp_path, capsys):
    from openmoe.metrics import main, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # killed while writing step 2
    assert read_metrics(str(tmp_path)) == [{"step": 1, "loss": 2.0}]
    assert f"warning: {path} line 2 is cut short" in capsys.readouterr().err
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    assert main([str(path)]) == 2
    assert capsys.readouterr().err == f"error: {path} line 2 is not a JSON record: 'not json'\n"
    assert main([str(tmp_path / "missing.jsonl")]) == 2
    assert "error: metrics file" in capsys.readouterr().err


def test_lora_adapters_rotate_with_their_checkpoints(tmp_path):
    """adapters/step-N/ (a PEFT copy beside each checkpoint) goes when --keep_last rotates checkpoints/step-N away;
    the adapter just written stays even before its checkpoint exists."""
    from openmoe.io.resumable import MANIFEST
    from openmoe.train.lora import prune_adapters

    for step in (4, 6):
        (tmp_path / "checkpoints" / f"step-{step:08d}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step-{step:08d}" / MANIFEST).write_text("{}")
    for step in (2, 4, 6, 8):
        (tmp_path / "adapters" / f"step-{step:08d}").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000002.unusable").mkdir()  # set aside by resume: not a kept checkpoint
    assert prune_adapters(str(tmp_path), keep=8) == [str(tmp_path / "adapters" / "step-00000002")]
    assert sorted(os.listdir(tmp_path / "adapters")) == ["step-00000004", "step-00000006", "step-00000008"]
    assert prune_adapters(str(tmp_path)) == [str(tmp_path / "adapters" / "step-00000008")]
    assert prune_adapters(str(tmp_path / "nothing")) == []


def test_lora_adapter_config_records_a_local_base_as_an_absolute_path(tmp_path, monkeypatch):
    from openmoe.train.lora import lora_config

    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    run = RunConfig.from_flat(lora_rank=4)
    assert lora_config(run, base="base").base_model_name_or_path == str(tmp_path / "base")
    assert lora_config(run, base="org/model").base_model_name_or_path == "org/model"  # a hub id, as given
    assert lora_config(run).base_model_name_or_path is None
