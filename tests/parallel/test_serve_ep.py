"""The server under expert parallelism: 2 gloo ranks with sharded experts (`torch.distributed.run -m openmoe.serve
--ep_size 2`), rank 0 answering HTTP, rank 1 following its broadcasts; answers == single-process greedy generation
for a batch split unevenly over the ranks and for a single prompt (rank 1 decodes a dummy row), including a stop
string that ends the batch early (rank 0's per-step stop decision reaches rank 1); SIGTERM to
rank 0 stops both ranks cleanly (rank 1 is released by rank 0's final broadcast)."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys

import openai
import torch

from openmoe import OpenMoeForCausalLM, preset
from openmoe.data import decode, load_tokenizer
from openmoe.generation import generate
from openmoe.inference import encode_batch
from tests.helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(ROOT, "tests", "assets", "tokenizer")


def expected(model, tok, prompt, max_tokens):
    ids, mask = encode_batch(tok, [prompt])
    new = generate(model, ids, mask, max_new_tokens=max_tokens, vocab_limit=len(tok))[0, ids.shape[1]:].tolist()
    return decode(tok, new[: new.index(1)] if 1 in new else new).lstrip()


def tiny_checkpoint(tmp_path):
    """A saved random tiny model with the test tokenizer beside it, and the model itself."""
    torch.manual_seed(0)
    model = OpenMoeForCausalLM(preset("tiny", initializer_range=0.2)).eval()
    ckpt = tmp_path / "tiny"
    model.save_pretrained(str(ckpt))
    for f in os.listdir(TOKENIZER):
        shutil.copy(os.path.join(TOKENIZER, f), ckpt)
    return model, ckpt


@contextlib.contextmanager
def ep_server(ckpt, *extra):
    """`torch.distributed.run --nproc_per_node 2 -m openmoe.serve --ep_size 2` on a free port: yields an openai
    client. On leaving, SIGTERM to rank 0 must stop both ranks with exit 0; on failure the whole launch is killed
    (killing only the launcher leaves ranks holding its pipes, and a failing test would hang)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(free_port()), "-m", "openmoe.serve", "--model", str(ckpt), "--ep_size", "2",
                             "--port", "0", "--decode", "eager", *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving tiny on http://127.0.0.1:"), proc.stderr.read()[-3000:] if not line else line
        yield openai.OpenAI(base_url=line.split(" on ")[1].split()[0], api_key="none", max_retries=0, timeout=120)
        os.kill(int(line.rsplit("pid ", 1)[1].rstrip(")\n")), signal.SIGTERM)  # rank 0 only
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=60)


def test_two_rank_expert_parallel_server_equals_single_process(tmp_path):
    model, ckpt = tiny_checkpoint(tmp_path)
    model.apply_options(model.options.replace(dropless=True))  # the server routes dropless too
    tok = load_tokenizer(TOKENIZER)
    with ep_server(ckpt) as client:
        prompts = ["Reverse the word: apple.", "Hi", "The sky is"]  # rows 0, 2 on rank 0, row 1 on rank 1
        res = client.completions.create(model="tiny", prompt=prompts, max_tokens=12, temperature=0)
        assert [c.text for c in res.choices] == [expected(model, tok, p, 12) for p in prompts]
        full = expected(model, tok, prompts[1], 24)
        stop = full[len(full) // 3: len(full) // 3 + 2]  # cut a third of the way in: the batch ends early
        res = client.completions.create(model="tiny", prompt=prompts[1], max_tokens=24, temperature=0, stop=stop)
        assert res.choices[0].text == full[: full.index(stop)] and res.choices[0].finish_reason == "stop"
        assert res.usage.completion_tokens < 24


def test_capacity_routing_odd_batch_over_two_ranks(tmp_path):
    """--capacity_routing under expert parallelism: capacity mode sizes its all-to-all from the local token count, so
    the ranks must hold equal shares of an odd batch at one width (it died in the all-to-all before). Each answer
    equals single-process decoding of that rank's rows (rank 0: rows 0, 2; rank 1: row 1 and a copy of row 0) with
    the same capacity routing."""
    from openmoe.inference import rank_rows

    model, ckpt = tiny_checkpoint(tmp_path)
    tok = load_tokenizer(TOKENIZER)
    prompts = ["Reverse the word: apple.", "Hi", "The sky is"]
    ids, mask = encode_batch(tok, prompts)
    want = {}
    for rank in range(2):
        rows, real = rank_rows(len(prompts), rank, 2)
        out = generate(model, ids[rows], mask[rows], max_new_tokens=10, vocab_limit=len(tok))[:, ids.shape[1]:]
        for i, new in zip(rows[:real], out.tolist()):
            want[i] = decode(tok, new[: new.index(1)] if 1 in new else new).lstrip()
    with ep_server(ckpt, "--capacity_routing") as client:
        res = client.completions.create(model="tiny", prompt=prompts, max_tokens=10, temperature=0)
        assert [c.text for c in res.choices] == [want[i] for i in range(len(prompts))]
