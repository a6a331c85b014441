"""Exports are self-contained (issue 16): transformers loads them with trust_remote_code in an interpreter where
openmoe cannot be imported, and they give our logits, greedy ids, pipeline text, tokenizer ids and chat-template ids.
The same check for transformers 5.x runs by hand: see tests/hf_export_check.py. Exports honour the umask."""

import os
import stat

import pytest
import torch

from openmoe import OpenMoeForCausalLM, preset
from tests import hf_export_check


def test_export_loads_without_openmoe_and_matches_ours(tmp_path):
    want = hf_export_check.build_export(str(tmp_path / "export"))
    got = hf_export_check.run_probe(os.sys.executable, str(tmp_path / "export"), want["spec"], str(tmp_path))
    assert got["model_module"].startswith("transformers_modules.")  # the shipped code, not ours
    assert hf_export_check.compare(want, got) == {k: "ok" for k in (
        "input_ids", "attention_mask", "greedy", "pipeline_text", "probe_ids", "chat_ids", "logits",
        "openmoe_importable")}
    assert want["input_ids"][1][:-2] == [0] * (len(want["input_ids"][1]) - 2)  # "Hi": left-padded, <pad> BOS


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_export_modes_follow_the_umask(tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        OpenMoeForCausalLM(preset("tiny", num_hidden_layers=2)).save_pretrained(str(tmp_path / "out"))
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode
    assert {stat.S_IMODE((out / f).stat().st_mode) for f in os.listdir(out)} == {file_mode}


def test_auto_classes_resolve_our_type_without_remote_code(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = OpenMoeForCausalLM(preset("tiny", num_hidden_layers=2)).eval()
    model.save_pretrained(str(tmp_path / "m"))
    assert type(AutoConfig.from_pretrained(str(tmp_path / "m"))).__name__ == "OpenMoeConfig"
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))  # registered on `import openmoe`
    assert type(loaded) is OpenMoeForCausalLM
    ids = torch.tensor([[0, 5, 9, 13]])
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_write_checkpoint_writes_the_tokenizer_into_the_same_directory(tmp_path):
    from transformers import AutoTokenizer

    from openmoe.data import encode, load_tokenizer
    from openmoe.hub import SHIPPED_TOKENIZER
    from openmoe.io.hf import write_checkpoint

    model = OpenMoeForCausalLM(preset("tiny", num_hidden_layers=2))
    tok = load_tokenizer(SHIPPED_TOKENIZER)
    write_checkpoint(str(tmp_path / "hf"), model.config, model.state_dict(), tokenizer=tok)
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "Input: naïve 🙂"
    assert exported(text)["input_ids"] == encode(tok, text) and exported.padding_side == "left"
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # written atomically, no temporary left behind
    loaded = OpenMoeForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert loaded.generation_config.suppress_tokens == list(range(len(tok), 1024))  # ids the tokenizer lacks
    assert loaded.generation_config.pad_token_id == 0


def test_dtype_and_resized_embeddings_through_transformers(tmp_path):
    model = OpenMoeForCausalLM(preset("tiny", num_hidden_layers=2))
    model.save_pretrained(str(tmp_path / "m"))
    half = OpenMoeForCausalLM.from_pretrained(str(tmp_path / "m"), torch_dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    model.resize_token_embeddings(1100)
    assert model.config.vocab_size == 1100 and model.lm_head.weight.shape == (1100, 64)
    assert model(torch.tensor([[0, 1099]])).logits.shape == (1, 2, 1100)


def test_attn_implementation_eager_selects_the_eager_reference(tmp_path):
    model = OpenMoeForCausalLM(preset("tiny", num_hidden_layers=2))
    model.save_pretrained(str(tmp_path / "m"))
    assert OpenMoeForCausalLM.from_pretrained(str(tmp_path / "m")).options.attn_impl == "sdpa"
    eager = OpenMoeForCausalLM.from_pretrained(str(tmp_path / "m"), attn_implementation="eager")
    assert {layer.self_attn.attn_impl for layer in eager.model.layers} == {"eager"}
