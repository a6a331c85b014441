"""Expert-parallel inference (2 gloo ranks, experts sharded) == single-device greedy output, including a batch where
one rank's prompt ends at once (EOS) while the other keeps decoding: the finished rank must keep stepping; and an odd
number of prompts (the ranks must still route equal token counts: capacity routing sizes its all-to-all from them)."""

import json
import os
import subprocess
import sys

import torch

from openmoe import OpenMoeForCausalLM, preset
from openmoe.data import load_tokenizer
from openmoe.generation import generate
from openmoe.inference import encode_batch
from openmoe.tokenizer import save_tokenizer
from tests.helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = ["Reverse the word: apple. Output:", "Write the word in capital letters. Input: ocean"]


def test_ep_inference_matches_single_device_with_early_eos(tmp_path):
    torch.manual_seed(3)
    model = OpenMoeForCausalLM(preset("tiny")).eval()
    tok = load_tokenizer(os.path.join(ROOT, "tests", "assets", "tokenizer"))
    ids, mask = encode_batch(tok, PROMPTS)
    free = generate(model, ids, mask, max_new_tokens=6, eos_token_id=-1, vocab_limit=len(tok))[:, ids.shape[1]:]
    eos = int(free[0, 0])  # prompt 0 (rank 0) will stop at its first token ...
    assert eos not in free[1].tolist()  # ... prompt 1 (rank 1) never emits it
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(str(ckpt))
    save_tokenizer(tok, str(ckpt))  # infer.py reads the model's own tokenizer
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["eos_token_id"] = eos
    (ckpt / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    common = ["--model", str(ckpt), "--prompt_file", str(tmp_path / "prompts.txt"), "--max_new_tokens", "6"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, "infer.py", *common], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert single.returncode == 0, single.stderr
    ep = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                         str(free_port()), "infer.py", *common, "--ep_size", "2"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=180)
    assert ep.returncode == 0, ep.stderr[-3000:]
    assert ep.stdout == single.stdout
    answers = ep.stdout.split("=== ")[1:]
    assert answers[0] == "0: \n" and len(answers[1]) > len("1: \n")  # rank 0 ended at once, rank 1 decoded on
    (tmp_path / "three.txt").write_text("\n".join([*PROMPTS, "Hi"]) + "\n")
    common[3] = str(tmp_path / "three.txt")  # rank 0 gets prompts 0 and 2, rank 1 prompt 1 and a dummy row
    single = subprocess.run([sys.executable, "infer.py", *common], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    ep = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                         str(free_port()), "infer.py", *common, "--ep_size", "2"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=180)
    assert single.returncode == 0 and ep.returncode == 0, ep.stderr[-3000:]  # it used to die in the all-to-all
    assert ep.stdout == single.stdout and ep.stdout.count("=== ") == 3
