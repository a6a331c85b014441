import json
import os
import subprocess
import sys

import pytest
import torch

from openmoe.config import MODEL_CODE_FILES, preset
from openmoe.generation import generate
from openmoe.io.hf import BIN_INDEX, SAFE_INDEX, write_checkpoint
from openmoe.model import OpenMoeForCausalLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return OpenMoeForCausalLM(preset("tiny")).eval()


def batch(seed=1, b=2, s=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 1024, (b, s), generator=g)
    ids[:, 0] = 0
    return ids


def test_save_load_identical_logits_single_and_sharded(model, tmp_path):
    ids = batch()
    want = model(ids).logits
    model.save_pretrained(str(tmp_path / "one"))
    # one weights file beside config.json and the model code its auto_map names (issue 16: self-contained exports)
    assert sorted(os.listdir(tmp_path / "one")) == sorted(["config.json", "model.safetensors", *MODEL_CODE_FILES])
    model.save_pretrained(str(tmp_path / "many"), max_shard_bytes=300_000)
    index = json.load(open(tmp_path / "many" / SAFE_INDEX))
    assert len(set(index["weight_map"].values())) > 2
    for d in ("one", "many"):
        loaded = OpenMoeForCausalLM.from_pretrained(str(tmp_path / d)).eval()
        assert torch.equal(loaded(ids).logits, want)


def test_published_bin_layout_with_index_and_old_config_spelling(model, tmp_path):
    sd = model.state_dict()
    names = list(sd)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for fname, keys in shards.items():
        torch.save({k: sd[k].clone() for k in keys}, tmp_path / fname)
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (tmp_path / BIN_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    raw = model.config.to_dict()
    raw["topk"] = raw.pop("router_topk")
    raw["capacity_factor_eval"] = raw.pop("router_capacity_factor_eval")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    loaded = OpenMoeForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = batch()
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_bad_checkpoints_give_one_clear_error(model, tmp_path):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dict(sd)
    del bad["model.layers.1.mlp.experts.wo"]
    bad["model.layers.1.mlp.extra_thing"] = torch.zeros(3)
    bad["lm_head.weight"] = torch.zeros(1000, 64)
    write_checkpoint(str(tmp_path / "bad"), model.config, bad)
    with pytest.raises(ValueError) as err:
        OpenMoeForCausalLM.from_pretrained(str(tmp_path / "bad"))
    msg = str(err.value)
    assert "missing keys ['model.layers.1.mlp.experts.wo']" in msg
    assert "unexpected keys ['model.layers.1.mlp.extra_thing']" in msg
    assert "lm_head.weight: checkpoint (1000, 64) vs model (1024, 64)" in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OpenMoeForCausalLM.from_pretrained(str(tmp_path / "nowhere"))


def test_atomic_save_keeps_old_checkpoint_when_write_fails(model, tmp_path, monkeypatch):
    target = str(tmp_path / "ckpt")
    model.save_pretrained(target)
    import openmoe.io.hf as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(target)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temp dir left, old checkpoint intact
    OpenMoeForCausalLM.from_pretrained(target)


def full_forward_greedy(model, ids, mask, steps):
    seqs, m = ids, mask
    per_step_logits = []
    for _ in range(steps):
        logits = model(seqs, attention_mask=m).logits[:, -1]
        per_step_logits.append(logits)
        nxt = logits.argmax(-1)
        seqs = torch.cat([seqs, nxt[:, None]], 1)
        m = torch.cat([m, torch.ones_like(nxt)[:, None]], 1)
    return seqs, per_step_logits


def test_kv_cache_greedy_equals_full_recomputation_with_left_padding(model):
    ids = batch(b=3, s=9)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding
    ids[2, :5], mask[2, :5] = 0, 0
    ids[1, 3], ids[2, 5] = 0, 0  # each row starts with its <pad> BOS
    want, want_logits = full_forward_greedy(model, ids, mask, 8)
    steps = []
    got = generate(model, ids, mask, max_new_tokens=8, eos_token_id=-1,
                         on_tokens=lambda tok, fin: steps.append(tok.clone()))
    assert torch.equal(got, want)
    # and each padded row decodes exactly as it would alone (positions count real tokens; pads never routed)
    for row in (1, 2):
        start = int((mask[row] == 0).sum())
        alone = generate(model, ids[row:row + 1, start:], max_new_tokens=8, eos_token_id=-1)
        assert torch.equal(alone[0, -8:], got[row, -8:])


def test_incremental_decoding_positions_match_full_forward(model):
    """RoPE positions during decoding: the old example was off by one here."""
    ids = batch(b=1, s=6)
    full = model(ids).logits
    out = model(ids[:, :4], use_cache=True)
    past = out.past_key_values
    for t in range(4, 6):
        step = model(ids[:, t:t + 1], past_key_values=past, use_cache=True)
        past = step.past_key_values
        assert torch.allclose(step.logits[:, -1], full[:, t], atol=1e-5)


def test_eos_and_stop_sequence_end_rows(model):
    ids = batch(b=2, s=5)
    free = generate(model, ids, max_new_tokens=6, eos_token_id=-1)
    first = free[:, 5]
    out = generate(model, ids, max_new_tokens=6, eos_token_id=int(first[0]))
    assert out[0, 5] == first[0] and (out[0, 6:] == 0).all()
    two = free[1, 5:7].tolist()
    out = generate(model, ids, max_new_tokens=6, eos_token_id=-1, stop_sequences=[two])
    assert out[1, 5:7].tolist() == two and (out[1, 7:] == 0).all()


def test_vocab_limit_is_never_exceeded(model):
    ids = batch(b=2, s=5)
    out = generate(model, ids, max_new_tokens=8, eos_token_id=-1, vocab_limit=300)
    free = generate(model, ids, max_new_tokens=8, eos_token_id=-1)
    assert (out[:, 5:] < 300).all() and (free[:, 5:] >= 300).any()


def test_eager_and_sdpa_attention_agree(model):
    ids = batch()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    model.apply_options(model.options.replace(attn_impl="eager"))
    a = model(ids, attention_mask=mask).logits
    model.apply_options(model.options.replace(attn_impl="sdpa"))
    b = model(ids, attention_mask=mask).logits
    assert torch.allclose(a, b, atol=1e-4)


SINGLE_DEVICE_MODULES = ["model", "router", "moe", "losses", "config", "io.hf", "generation"]


def test_model_modules_import_without_colossalai_or_distributed():
    """STYLE's seam: the model is written for one device; parallelism is applied from outside."""
    import ast

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for name in SINGLE_DEVICE_MODULES:
        tree = ast.parse(open(os.path.join(root, "openmoe", name.replace(".", os.sep) + ".py")).read())
        imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        assert not [m for m in imported if m.startswith(("colossalai", "torch.distributed"))], name
    code = ("import sys; sys.modules['colossalai'] = None\n"
            + "".join(f"import openmoe.{n}\n" for n in SINGLE_DEVICE_MODULES) + "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert res.stdout.strip() == "ok", res.stderr


def test_random_init_is_finite_everywhere():
    torch.manual_seed(0)
    m = OpenMoeForCausalLM(preset("tiny"))
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert all(p.abs().sum() > 0 for p in m.parameters())
