"""Launching train.py as users do. Through openmoe.launch (what train.sh runs) on 2 CPU ranks: an argument value with
a space, a quote and a $ reaches train.py as typed (colossalai run joins the arguments into one shell line), an
empty value too, and an argparse mistake is one line per rank, not the usage text. Directly as
`python train.py` (no launcher): a one-process run."""

import json
import os
import subprocess
import sys

from tests.helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
ALPACA = os.path.join(ROOT, "tests", "assets", "data", "alpaca.jsonl")
TINY = ["--model_name", "tiny", "--batch_size", "2", "--max_length", "64", "--max_steps", "1", "--no-tensorboard"]


def launch(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"], OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "openmoe.launch", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_system_prompt_with_spaces_quotes_and_dollar_arrives_intact(tmp_path):
    prompt = "Be brief. It's $HOME \"x\""
    out = tmp_path / "run"
    # 2 records: one per rank; max_length 128 leaves the alpaca answers room after the system prompt
    res = launch(*TINY, "--batch_size", "1", "--max_length", "128", "--dataset", ALPACA, "--system_prompt", prompt,
                 "--output_path", str(out))
    log = res.stdout + res.stderr
    assert res.returncode == 0 and "done: 1 steps" in log, log[-3000:]
    saved = json.load(open(out / "checkpoints" / "step-00000001" / "trainer_state.json"))["run"]
    assert saved["data"]["system_prompt"] == prompt


def test_an_empty_value_arrives_and_an_argparse_mistake_is_one_line_per_rank(tmp_path):
    # unquoted, "" vanished and --system_prompt took --plugin as missing its value
    res = launch(*TINY, "--system_prompt", "", "--plugin", "epp", "--output_path", str(tmp_path / "run"))
    log = res.stdout + res.stderr
    assert res.returncode != 0
    line = ("train.py: error: argument --plugin: invalid choice: 'epp' (choose from 'ep', 'ep_zero', 'hybrid'); see "
            "python train.py --help")
    assert log.splitlines().count(line) == 2, log[-3000:]
    assert "usage:" not in log and len(log.splitlines()) < 15, log


def test_python_train_py_without_a_launcher_runs_as_one_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    out = tmp_path / "single"
    res = subprocess.run([sys.executable, "train.py", *TINY, "--max_steps", "2", "--dataset",
                          "data/sample/train.jsonl", "--output_path", str(out)], cwd=ROOT,
                         env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    log = res.stdout + res.stderr
    assert res.returncode == 0 and "done: 2 steps" in log, log[-3000:]
    assert ("info: no RANK/WORLD_SIZE in the environment (not started by torchrun or colossalai run): running as a "
            "single process (MASTER_ADDR 127.0.0.1, MASTER_PORT ") in log
    assert "plugin ep: world 1," in log and os.path.isfile(out / "hf" / "config.json")
