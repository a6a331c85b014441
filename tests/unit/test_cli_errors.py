"""User mistakes on the command line end in one line that names the value and what is accepted: argparse errors of
train.py and infer.py (no usage wall), --model / --pretrained paths that are not a model, sampling values; and the
launcher's own input handling (argument quoting for colossalai run's shell line, which variables it masks)."""

import os
import subprocess
import sys

import pytest

from openmoe.hub import resolve_model
from openmoe.launch import quote_script_args, redact, secret_values
from openmoe.train.config import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


@pytest.mark.parametrize("argv, line", [
    (["--plugin", "epp"], "argument --plugin: invalid choice: 'epp' (choose from 'ep', 'ep_zero', 'hybrid')"),
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["--batch_size", "four"], "argument --batch_size: invalid int value: 'four'"),
    (["--learning_rate", "1e-4"], "unrecognized arguments: --learning_rate 1e-4 (did you mean --lr?)"),
    (["--batchsize", "2", "--output_dir", "x"],
     "unrecognized arguments: --batchsize 2 --output_dir x (did you mean --batch_size for --batchsize, --output_path "
     "for --output_dir?)"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),  # nothing close: no guess
    (["--system_prompt"], "argument --system_prompt: expected one argument"),
])
def test_train_argparse_errors_are_one_line(argv, line, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err == f"train.py: error: {line}; see python train.py --help\n"


def test_train_and_infer_scripts_print_only_the_line():
    res = run("train.py", "--plugin", "epp")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == ("train.py: error: argument --plugin: invalid choice: 'epp' (choose from 'ep', 'ep_zero', "
                          "'hybrid'); see python train.py --help\n")
    res = run("infer.py", "--model", "tiny", "--topp", "0.9")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == ("infer.py: error: unrecognized arguments: --topp 0.9 (did you mean --top_p?); see python "
                          "infer.py --help\n")


@pytest.mark.parametrize("argv, line", [
    (["--top_p", "5"], "--top_p (5.0) must be in (0, 1]; 1.0 is off"),
    (["--top_p", "0"], "--top_p (0.0) must be in (0, 1]; 1.0 is off"),
    (["--temperature", "-0.5"], "--temperature (-0.5) must be >= 0"),
    (["--temperature", "nan"], "--temperature (nan) must be >= 0"),
    (["--top_k", "-1"], "--top_k (-1) must be >= 0; 0 is off"),
    (["--max_new_tokens", "0"], "--max_new_tokens (0) must be >= 1"),
])
def test_infer_refuses_sampling_values_before_loading(argv, line, capsys):
    sys.path.insert(0, ROOT)
    try:
        from infer import main
    finally:
        sys.path.remove(ROOT)
    assert main(["--model", "no/such-model", "--prompt", "x", "--do_sample", *argv]) == 2  # checked before --model
    assert capsys.readouterr().err == f"error: {line}\n"


@pytest.fixture
def run_dir(tmp_path):
    """What train.py leaves: OUT/hf (the export) and OUT/checkpoints/step-N/model, each with a config.json."""
    out = tmp_path / "outputs" / "tiny-ep"
    step = out / "checkpoints" / "step-00000180"
    for model in (out / "hf", step / "model"):
        model.mkdir(parents=True)
        (model / "config.json").write_text("{}")
    return out, step


def test_a_run_or_checkpoint_directory_names_the_model_inside(run_dir, tmp_path):
    out, step = run_dir
    with pytest.raises(FileNotFoundError) as e:
        resolve_model(str(out))
    assert str(e.value) == f"{out} is not a model directory (no config.json); did you mean {out}/hf?"
    with pytest.raises(FileNotFoundError) as e:
        resolve_model(str(step))
    assert str(e.value) == f"{step} is not a model directory (no config.json); did you mean {step}/model?"
    assert resolve_model(str(out / "hf")) == str(out / "hf")
    with pytest.raises(FileNotFoundError) as e:
        resolve_model(str(tmp_path))
    assert str(e.value) == (f"{tmp_path} is not a model directory (no config.json); accepted: a directory holding "
                            "config.json and the weights")
    with pytest.raises(FileNotFoundError) as e:
        resolve_model(str(out / "hf" / "config.json"))
    assert str(e.value) == (f"{out}/hf/config.json is a file; accepted: a checkpoint directory, a hub id (owner/name) "
                            "or a preset (34b, 8b, base, tiny)")


def test_infer_model_errors_are_one_line(run_dir, tmp_path):
    out, step = run_dir
    rel = os.path.relpath(out, tmp_path)  # outputs/tiny-ep, as a user types it from the parent directory
    env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    infer = os.path.join(ROOT, "infer.py")

    def infer_error(model):
        res = subprocess.run([sys.executable, infer, "--model", model, "--prompt", "x"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120, env=dict(os.environ, **env))
        assert res.returncode == 2 and res.stdout == "", res.stderr[-2000:]
        return res.stderr

    assert infer_error(rel) == f"error: {rel} is not a model directory (no config.json); did you mean {rel}/hf?\n"
    assert infer_error(f"{rel}/checkpoints/step-00000180") == (
        f"error: {rel}/checkpoints/step-00000180 is not a model directory (no config.json); did you mean "
        f"{rel}/checkpoints/step-00000180/model?\n")
    # a typo beside an existing outputs/: a local path first, and the hub offline
    assert infer_error("outputs/nope") == (
        "error: outputs/nope is neither an existing local directory (outputs/ holds no 'nope') nor a hub model id "
        f"that could be fetched (the hub is offline (HF_HUB_OFFLINE=1) and the HF cache {tmp_path}/hf_home/hub does "
        "not hold it)\n")
    # nothing local it could be: the hub's answer, and that it is no local directory either
    err = infer_error("someone/not-cached")
    assert err.startswith("error: hub model 'someone/not-cached' could not be resolved (offline (HF_HUB_OFFLINE=1), "
                          f"cache {tmp_path}/hf_home/hub): LocalEntryNotFoundError: ")
    assert err.endswith("; it is not a local directory either\n") and err.count("\n") == 1


def test_script_arguments_are_quoted_for_colossalai_runs_shell_line():
    args = ["--nproc_per_node", "2", "--master_port", "29500", "--ssh-port=22", "train.py", "--system_prompt",
            "Be brief.", "--task_name", "", "--text_field", "it's $HOME"]
    assert quote_script_args(args) == ["--nproc_per_node", "2", "--master_port", "29500", "--ssh-port=22", "train.py",
                                       "--system_prompt", "'Be brief.'", "--task_name", "''", "--text_field",
                                       "'it'\"'\"'s $HOME'"]
    # colossalai run's own options are parsed by click without a shell: left as typed (a hostfile path with a space)
    assert quote_script_args(["--hostfile", "my hosts", "-m", "pkg.mod", "a b"]) == [
        "--hostfile", "my hosts", "-m", "pkg.mod", "'a b'"]


def test_launcher_masks_secrets_but_not_the_working_directory(tmp_path):
    env = {"PWD": str(tmp_path), "OLDPWD": "/tmp", "MYSQL_PWD": "hunter22", "HF_TOKEN": "hf_abcdef123",
           "HF_TOKEN_PATH": str(tmp_path), "SSL_KEY_DIR": "/usr", "AWS_SECRET_ACCESS_KEY": "/not/a/dir/secret"}
    secrets = secret_values(env)
    assert secrets == ["/not/a/dir/secret", "hf_abcdef123", "hunter22"]
    line = f"error: dataset file {tmp_path}/data/nope.jsonl does not exist (token hf_abcdef123, pwd hunter22)"
    assert redact(line, secrets) == (
        f"error: dataset file {tmp_path}/data/nope.jsonl does not exist (token ***, pwd ***)")
