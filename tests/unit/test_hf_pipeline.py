"""Exports carry their tokenizer and work with transformers.pipeline("text-generation", model=DIR) offline:

  * upcycle, mixtral and t5x exports hold the source's (or --tokenizer's) tokenizer, and AutoTokenizer on the
    export encodes as the source tokenizer does; a source without one gets a one-line note;
  * config.json names the tokenizer class written beside it (pipeline() loads no tokenizer for a remote-code model
    otherwise), for the trainer's export (write_checkpoint) and the converters', and the pipeline generates.

    .venv/bin/python -m pytest tests/unit/test_hf_pipeline.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from transformers import AutoTokenizer

from openmoe import OpenMoeForCausalLM, preset
from openmoe.convert.__main__ import main as convert_main
from openmoe.data import encode, load_tokenizer
from openmoe.hub import SHIPPED_TOKENIZER, TOKENIZER_FILES
from openmoe.io.hf import write_checkpoint
from tests.unit.test_convert_t5x import _tiny_model, t5x_params_from_model, write_t5x_checkpoint
from tests.unit.test_upcycle import tiny_llama

TEXT = "Reverse the word: naïve café. Output: 🙂"
UPCYCLE = ["--num_experts", "4", "--top_k", "2"]


def dense_with_tokenizer(path):
    """A tiny LLaMA (vocab 1024) with a tokenizer of its own (the shipped 768 pieces, saved as a fast tokenizer)."""
    tiny_llama(path, num_hidden_layers=2)
    AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER).save_pretrained(str(path))
    return path


def tokenizer_class(directory) -> str | None:
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f).get("tokenizer_class")


def test_upcycle_and_mixtral_exports_carry_the_source_tokenizer(tmp_path):
    dense = dense_with_tokenizer(tmp_path / "dense")
    up, mix = tmp_path / "up", tmp_path / "mixtral"
    assert convert_main(["upcycle", "--dense", str(dense), *UPCYCLE, "--output", str(up)]) == 0
    assert convert_main(["mixtral", "--moe", str(up), "--output", str(mix)]) == 0
    want = AutoTokenizer.from_pretrained(str(dense))(TEXT)["input_ids"]
    assert len(want) > 5
    for export in (up, mix):
        assert AutoTokenizer.from_pretrained(str(export))(TEXT)["input_ids"] == want, export
    with open(up / "tokenizer_config.json") as f:
        assert tokenizer_class(up) == json.load(f)["tokenizer_class"]  # the class actually written
    # the embedding has 1024 rows for 768 pieces: generate() stays off the ids no tokenizer piece has
    assert OpenMoeForCausalLM.from_pretrained(str(up)).generation_config.suppress_tokens == list(range(768, 1024))


def test_a_source_without_tokenizer_gets_a_note_and_tokenizer_adds_one(tmp_path, capsys):
    tiny_llama(tmp_path / "dense", num_hidden_layers=2)
    out = tmp_path / "up"
    assert convert_main(["upcycle", "--dense", str(tmp_path / "dense"), *UPCYCLE, "--output", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"note: {out} has no tokenizer (--dense {tmp_path / 'dense'} holds none of {', '.join(TOKENIZER_FILES)}); "
        "AutoTokenizer, pipeline() and train.py --pretrained need one: convert again with --tokenizer PATH "
        "--overwrite")
    assert not [f for f in TOKENIZER_FILES if os.path.isfile(out / f)] and tokenizer_class(out) is None

    assert convert_main(["upcycle", "--dense", str(tmp_path / "dense"), *UPCYCLE, "--output", str(out),
                         "--overwrite", "--tokenizer", SHIPPED_TOKENIZER]) == 0
    assert "note:" not in capsys.readouterr().out
    want = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)(TEXT)["input_ids"]
    assert AutoTokenizer.from_pretrained(str(out))(TEXT)["input_ids"] == want


def test_t5x_export_with_tokenizer_encodes_as_training(tmp_path):
    """The openmoe family: the umT5 model written with OpenMoE's conventions (<pad> BOS, byte fallback)."""
    ckpt = write_t5x_checkpoint(t5x_params_from_model(_tiny_model()), str(tmp_path / "t5x"))
    out = tmp_path / "hf"
    assert convert_main(["t5x", "--checkpoint", ckpt, "--config", "tiny", "--output", str(out),
                         "--tokenizer", SHIPPED_TOKENIZER]) == 0
    assert tokenizer_class(out) == "PreTrainedTokenizer"  # transformers drops "Fast"; AutoTokenizer adds it back
    assert AutoTokenizer.from_pretrained(str(out))(TEXT)["input_ids"] == encode(load_tokenizer(SHIPPED_TOKENIZER),
                                                                                 TEXT)


PIPELINE = r'''
import json, sys
from transformers import pipeline

prompt, new = "Reverse the word: apple. Output:", 5
out = {}
for export in sys.argv[1:]:
    pipe = pipeline("text-generation", model=export, trust_remote_code=True)
    text = pipe(prompt, max_new_tokens=new, do_sample=False)[0]["generated_text"]
    ids = pipe(prompt, max_new_tokens=new, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    out[export] = {"text": text, "new_ids": len(ids) - len(pipe.tokenizer(prompt)["input_ids"]), "prompt": prompt,
                   "max_new_tokens": new}
print(json.dumps(out))
'''


def test_pipeline_generates_from_trainer_and_converter_exports_offline(tmp_path):
    trained = tmp_path / "trained"  # train.py's OUT/hf: write_checkpoint with the training tokenizer
    model = OpenMoeForCausalLM(preset("tiny", num_hidden_layers=2))
    write_checkpoint(str(trained), model.config, model.state_dict(), tokenizer=load_tokenizer(SHIPPED_TOKENIZER))
    assert tokenizer_class(trained) == "PreTrainedTokenizer"  # transformers drops "Fast"; AutoTokenizer adds it back
    upcycled = tmp_path / "up"
    assert convert_main(["upcycle", "--dense", str(dense_with_tokenizer(tmp_path / "dense")), *UPCYCLE,
                         "--output", str(upcycled)]) == 0

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"),
               OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    res = subprocess.run([sys.executable, "-c", PIPELINE, str(trained), str(upcycled)], capture_output=True,
                         text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    for export in (trained, upcycled):
        r = got[str(export)]
        assert r["text"].startswith(r["prompt"]) and len(r["text"]) > len(r["prompt"]), r
        assert 1 <= r["new_ids"] <= r["max_new_tokens"], r
