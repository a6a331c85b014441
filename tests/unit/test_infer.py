import os
import subprocess
import sys

import pytest
import torch

from openmoe import OpenMoeForCausalLM, preset
from openmoe.data import decode, load_tokenizer
from openmoe.generation import generate
from openmoe.inference import chat_prompt, chat_stop_sequences, encode_batch, input_device, load_model
from openmoe.tokenizer import save_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(ROOT, "tests", "assets", "tokenizer")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    OpenMoeForCausalLM(preset("tiny")).save_pretrained(str(d))
    save_tokenizer(load_tokenizer(TOKENIZER), str(d))  # infer.py reads the model's own tokenizer
    return str(d)


def test_chat_template_two_turns():
    text = chat_prompt([("user", "Hi!"), ("assistant", "Hello."), ("user", "Name a colour.")], system="Be brief.")
    assert text == ("<<SYS>>\nBe brief.\n<</SYS>>\n\n"
                    "<s>[INST] Hi! [/INST] Hello. </s><s>[INST] Name a colour. [/INST]")
    with pytest.raises(ValueError, match="must end with a user turn"):
        chat_prompt([("user", "a"), ("assistant", "b")])


def test_chat_stop_sequences_spell_eos():
    tok = load_tokenizer(TOKENIZER)
    stops = chat_stop_sequences(tok)
    assert stops and all(decode(tok, s).strip().endswith("</s>") for s in stops)
    assert tok.eos_token_id not in sum(stops, [])  # pieces, not the EOS token


def test_device_map_with_disk_offload_equals_single_device(ckpt, tmp_path):
    ids, mask = encode_batch(load_tokenizer(TOKENIZER), ["Reverse the word: apple.", "Hi"])
    plain = OpenMoeForCausalLM.from_pretrained(ckpt).eval()
    want = generate(plain, ids, mask, max_new_tokens=6, eos_token_id=-1)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    split = load_model(ckpt, torch.float32, device_map=device_map, offload_dir=str(tmp_path / "offload"))
    device = input_device(split)
    # layers 1 and 3 really live on disk: their weights are read from the checkpoint file when they run
    assert {split.model.layers[i].self_attn.q_proj.weight.device.type for i in (1, 3)} == {"meta"}
    assert split.model.layers[0].self_attn.q_proj.weight.device.type == "cpu"
    got = generate(split, ids.to(device), mask.to(device), max_new_tokens=6, eos_token_id=-1)
    assert torch.equal(got, want)


@pytest.fixture(scope="module")
def infer_cli():
    """infer.py loaded as a module, so that comparisons between its modes run in this process (each subprocess costs
    seconds of imports); what users type is covered by the run_infer tests."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("infer_cli", os.path.join(ROOT, "infer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def infer_output(infer_cli, capsys, *args) -> str:
    """infer.py's stdout for these arguments, run in this process; asserts exit code 0."""
    capsys.readouterr()
    code = infer_cli.main(list(args))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def run_infer(*args, stdin=None):
    return subprocess.run([sys.executable, "infer.py", *args], cwd=ROOT, capture_output=True, text=True,
                          input=stdin, timeout=120)


def test_cli_batch_greedy_matches_library(ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Reverse the word: apple.\\nOutput:\nHi\n")
    res = run_infer("--model", ckpt, "--prompt_file", str(prompts), "--max_new_tokens", "5")
    assert res.returncode == 0, res.stderr
    tok = load_tokenizer(TOKENIZER)
    model = OpenMoeForCausalLM.from_pretrained(ckpt).eval()
    ids, mask = encode_batch(tok, ["Reverse the word: apple.\nOutput:", "Hi"])
    out = generate(model, ids, mask, max_new_tokens=5, vocab_limit=len(tok))  # the reference decode
    want = [decode(tok, [t for t in row[ids.shape[1]:].tolist() if t not in (0, 1)]).strip() for row in out]
    assert res.stdout.splitlines() == [f"=== 0: {want[0]}", f"=== 1: {want[1]}"]


def test_cli_interactive_chat_keeps_conversation(ckpt):
    res = run_infer("--model", ckpt, "--chat", "--interactive", "--max_new_tokens", "3", "--no_stream",
                    stdin="hello\nand again\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("assistant> ") == 2


def test_cli_bad_inputs(ckpt, tmp_path):
    res = run_infer("--model", str(tmp_path / "missing"), "--prompt", "x")
    assert res.returncode == 2 and "error: checkpoint directory" in res.stderr and "does not exist" in res.stderr
    res = run_infer("--model", ckpt, "--prompt", "x", "--dtype", "fp16")
    assert res.returncode == 2 and "fp16 is refused" in res.stderr
    small = tmp_path / "small"
    OpenMoeForCausalLM(preset("tiny", vocab_size=512)).save_pretrained(str(small))
    res = run_infer("--model", str(small), "--tokenizer", TOKENIZER, "--prompt", "x")
    assert res.returncode == 2 and "768" in res.stderr and "512" in res.stderr, res.stderr


def test_cli_refuses_lengths_it_cannot_serve(ckpt, tmp_path):
    """One line each: --max_new_tokens below 1, an empty prompt file, a prompt that with the new tokens would run past
    max_position_embeddings (it used to generate garbage and exit 0)."""
    res = run_infer("--model", ckpt, "--prompt", "x", "--max_new_tokens", "-5")
    assert res.returncode == 2 and res.stderr.strip() == "error: --max_new_tokens (-5) must be >= 1", res.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    res = run_infer("--model", ckpt, "--prompt_file", str(empty))
    assert res.returncode == 2 and res.stderr.strip() == (f"error: --prompt_file {empty} holds no prompt (one per "
                                                          "non-empty line)"), res.stderr
    limit = OpenMoeForCausalLM.from_pretrained(ckpt).config.max_position_embeddings
    res = run_infer("--model", ckpt, "--prompt", "word " * limit, "--max_new_tokens", "4")
    assert res.returncode == 2 and "--max_new_tokens 4 exceeds the model's max_position_embeddings" in res.stderr
    assert res.stderr.strip().count("\n") == 0, res.stderr


def test_init_expert_parallel_checks_the_launch(monkeypatch):
    """The one process-group start of infer.py and openmoe.serve: refused without a launcher, and when the launched
    world does not match --ep_size (a real gloo group of one process)."""
    import torch.distributed as dist

    from openmoe.inference import init_expert_parallel
    from tests.helpers import free_port

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"--ep_size 2 needs a distributed launch: torchrun --nproc_per_node 2 x\.py"):
        init_expert_parallel(2, "torchrun --nproc_per_node 2 x.py")
    for key, value in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(free_port()))):
        monkeypatch.setenv(key, value)
    try:
        with pytest.raises(ValueError, match=r"--ep_size \(2\) must equal the number of launched processes \(1\)"):
            init_expert_parallel(2, "torchrun --nproc_per_node 2 x.py")
        assert dist.get_backend() == "gloo"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_cli_fast_decode_equals_eager(ckpt, tmp_path, infer_cli, capsys):
    """--decode fast (the default on one GPU; forced here on CPU, fp32) prints what the eager reference prints with
    dropless routing: a left-padded batch, greedy, then seeded sampling; chat answers through the streamer too.
    --decode fast where it cannot run is one error line."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Reverse the word: apple.\\nOutput:\nHi\nSort the numbers: 5, 2, 9\n")
    common = ["--model", ckpt, "--prompt_file", str(prompts), "--max_new_tokens", "6"]
    for extra in ([], ["--do_sample", "--temperature", "0.8", "--top_k", "40", "--seed", "3"]):
        eager = infer_output(infer_cli, capsys, *common, *extra, "--decode", "eager", "--dropless")
        fast = infer_output(infer_cli, capsys, *common, *extra, "--decode", "fast")
        assert fast == eager and fast.count("=== ") == 3
    chat = ["--model", ckpt, "--chat", "--prompt", "Name a colour.", "--max_new_tokens", "5"]
    eager = infer_output(infer_cli, capsys, *chat, "--decode", "eager", "--dropless")
    assert infer_output(infer_cli, capsys, *chat, "--decode", "fast") == eager and eager.strip()
    res = run_infer("--model", ckpt, "--prompt", "x", "--decode", "fast", "--device_map", "auto")
    assert res.returncode == 2 and res.stderr.strip() == ("error: --decode fast runs the whole model on one device; "
                                                          "with --device_map auto use --decode eager"), res.stderr
