"""Published checkpoints with no manual steps (issue 16): the published layout loads (old config spelling, .bin
shards, upstream's custom tokenizer class read from its spiece.model), a hub id resolves from the HF cache with the
hub offline, infer.py needs no --tokenizer for them, and a model without a tokenizer is one clear error."""

import json
import os
import subprocess
import sys

import pytest
import torch

from openmoe import OpenMoeForCausalLM, preset
from openmoe.data import decode, encode, load_tokenizer
from openmoe.generation import generate
from openmoe.hub import SHIPPED_TOKENIZER, tokenizer_path
from openmoe.inference import encode_batch
from openmoe.tokenizer import load_tokenizer as load_any_tokenizer
from tests.published_layout import write_hub_cache, write_published_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO = "OrionZheng/openmoe-tiny-fixture"


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    torch.manual_seed(5)
    model = OpenMoeForCausalLM(preset("tiny")).eval()
    d = tmp_path_factory.mktemp("published") / "openmoe-tiny"
    write_published_checkpoint(str(d), model, os.path.join(SHIPPED_TOKENIZER, "spiece.model"))
    return model, str(d)


def test_published_layout_loads_model_and_custom_tokenizer(published):
    model, d = published
    loaded = OpenMoeForCausalLM.from_pretrained(d).eval()
    assert (loaded.config.router_topk, loaded.config.model_type) == (model.config.router_topk, "openmoe")
    ids = torch.tensor([[0, 17, 300, 45]])
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    tok = load_any_tokenizer(d)  # tokenizer_config names OpenMoeTokenizer: its spiece.model is read instead
    text = "naïve café 東京 🙂"
    assert encode(tok, text) == encode(load_tokenizer(SHIPPED_TOKENIZER), text)


def test_tokenizer_defaults(published, tmp_path):
    _, d = published
    assert tokenizer_path(d) == d  # the model's own
    assert tokenizer_path(None, "tiny") == SHIPPED_TOKENIZER  # the shipped one: tiny preset only
    with pytest.raises(ValueError, match="no tokenizer for preset 'base' .* pass --tokenizer"):
        tokenizer_path(None, "base")
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(ValueError, match=f"no tokenizer for model directory {bare} "):
        tokenizer_path(str(bare))


def run(args, env):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **env))


def test_hub_id_resolves_offline_and_infers_without_tokenizer_flag(published, tmp_path):
    model, d = published
    hf_home = str(tmp_path / "hf")
    snapshot = write_hub_cache(hf_home, REPO, d)
    env = {"HF_HOME": hf_home, "HF_HUB_OFFLINE": "1"}
    probe = ("import json; from openmoe.hub import resolve_model\n"
             f"out = {{'hit': resolve_model('{REPO}')}}\n"
             "try:\n    resolve_model('someone/not-cached')\nexcept FileNotFoundError as e:\n    out['miss'] = str(e)\n"
             "print(json.dumps(out))")
    res = run(["-c", probe], env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert os.path.realpath(out["hit"]) == os.path.realpath(snapshot)
    assert out["miss"].startswith("hub model 'someone/not-cached' could not be resolved (offline (HF_HUB_OFFLINE=1)")
    assert "\n" not in out["miss"]

    res = run(["infer.py", "--model", REPO, "--prompt", "Reverse the word: apple.", "--max_new_tokens", "5",
               "--no_stream"], env)
    assert res.returncode == 0, res.stderr
    tok = load_tokenizer(SHIPPED_TOKENIZER)
    ids, mask = encode_batch(tok, ["Reverse the word: apple."])
    new = generate(model, ids, mask, max_new_tokens=5, vocab_limit=len(tok))[0, ids.shape[1]:].tolist()
    new = new[: new.index(1)] if 1 in new else new
    assert res.stdout.splitlines() == [f"=== 0: {decode(tok, new).strip()}"]


def test_non_tiny_model_without_tokenizer_is_one_line(tmp_path):
    res = run(["infer.py", "--model", "base", "--prompt", "x"], {})
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("error: no tokenizer for preset 'base'")
