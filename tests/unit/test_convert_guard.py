"""Every converter refuses an existing non-empty --output in one line, before it reads any weights, and leaves the
directory as it was; with --overwrite it replaces it atomically (no `.NAME.old-*` or `.NAME.tmp-*` sibling left).

    .venv/bin/python -m pytest tests/unit/test_convert_guard.py -q
"""

from __future__ import annotations

import os

import pytest

from openmoe import OpenMoeForCausalLM, preset
from openmoe.convert.__main__ import main as convert_main
from tests.unit.test_convert_t5x import _tiny_model, t5x_params_from_model, write_t5x_checkpoint
from tests.unit.test_upcycle import tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "data", "sample", "train.jsonl")


def victim(path) -> dict[str, bytes]:
    """A trained model's export (config.json included) at `path`; returns its files' contents."""
    OpenMoeForCausalLM(preset("tiny", num_hidden_layers=2)).save_pretrained(str(path))
    (path / "notes.txt").write_text("the user's own file")
    return snapshot(path)


def snapshot(path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


def upcycle_args(tmp_path, layers=2):
    tiny_llama(tmp_path / "dense", num_hidden_layers=layers)
    return ["upcycle", "--dense", str(tmp_path / "dense"), "--num_experts", "4", "--top_k", "2"]


def mixtral_args(tmp_path):
    assert convert_main(upcycle_args(tmp_path) + ["--output", str(tmp_path / "moe")]) == 0
    return ["mixtral", "--moe", str(tmp_path / "moe")]


def moefy_args(tmp_path):
    tiny_llama(tmp_path / "dense", num_hidden_layers=2, intermediate_size=128)
    return ["moefy", "--dense", str(tmp_path / "dense"), "--num_experts", "4", "--top_k", "2", "--data", DATA,
            "--tokenizer", os.path.join(ROOT, "tests", "assets", "tokenizer"), "--seq_len", "32",
            "--max_tokens", "256", "--router_steps", "2"]


def t5x_args(tmp_path):
    ckpt = write_t5x_checkpoint(t5x_params_from_model(_tiny_model()), str(tmp_path / "t5x"))
    return ["t5x", "--checkpoint", ckpt, "--config", "tiny"]


# name -> (arguments but --output, module, the first thing there that reads the source's weights: it must not run
# before the refusal)
CONVERTERS = {
    "upcycle": (upcycle_args, "openmoe.convert.upcycle", "read_llama_weights"),
    "mixtral": (mixtral_args, "openmoe.convert.mixtral", "read_tensors"),
    "moefy": (moefy_args, "openmoe.convert.moefy", "capture_ffn_inputs"),
    "t5x": (t5x_args, "openmoe.convert.t5x", "read_msgpack_tree"),
}


@pytest.mark.parametrize("name", sorted(CONVERTERS))
def test_existing_output_is_refused_then_replaced_with_overwrite(tmp_path, capsys, monkeypatch, name):
    build, module, reader = CONVERTERS[name]
    args = build(tmp_path)
    out = tmp_path / "victim"
    before = victim(out)
    capsys.readouterr()

    with monkeypatch.context() as m:  # the refusal comes before anything is read
        m.setattr(f"{module}.{reader}", lambda *a, **k: pytest.fail(f"{reader} ran before the output check"))
        assert convert_main(args + ["--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: refusing to write into {out}: it exists and is not empty; pass --overwrite to replace it\n"
    assert snapshot(out) == before

    assert convert_main(args + ["--output", str(out), "--overwrite"]) == 0
    after = snapshot(out)
    assert "notes.txt" not in after and after["config.json"] != before["config.json"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".victim.")]


def test_empty_directory_needs_no_overwrite_and_a_file_is_refused(tmp_path, capsys):
    args = upcycle_args(tmp_path)
    (tmp_path / "empty").mkdir()
    assert convert_main(args + ["--output", str(tmp_path / "empty")]) == 0
    assert os.path.isfile(tmp_path / "empty" / "config.json")
    (tmp_path / "file").write_text("x")
    capsys.readouterr()
    assert convert_main(args + ["--output", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err == (f"error: refusing to write into {tmp_path / 'file'}: it exists and is not a "
                                       "directory; pass --overwrite to replace it\n")
    assert (tmp_path / "file").read_text() == "x"


def test_overwrite_never_replaces_a_directory_holding_an_input(tmp_path, capsys):
    args = mixtral_args(tmp_path)
    before = snapshot(tmp_path / "moe")
    capsys.readouterr()
    assert convert_main(args + ["--output", str(tmp_path / "moe"), "--overwrite"]) == 2
    assert capsys.readouterr().err == (f"error: refusing to overwrite {tmp_path / 'moe'}: it holds the input "
                                       f"{tmp_path / 'moe'}; write to another --output\n")
    assert snapshot(tmp_path / "moe") == before


@pytest.mark.parametrize("name", sorted(CONVERTERS))
def test_every_converter_offers_overwrite(name, capsys):
    with pytest.raises(SystemExit):
        convert_main([name, "--help"])
    assert "--overwrite" in capsys.readouterr().out
