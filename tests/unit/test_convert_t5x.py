"""T5X -> HF conversion: a tiny OpenMoE written as a T5X checkpoint directory, converted by the CLI, same logits.

The writer below is the test's own, independent of the converter's table, and produces T5X's on-disk format as
t5x/checkpoints.py writes it (read in XueFuzhao/t5x, the fork OpenMoE trained with, and google-research/t5x):
  * `checkpoint_STEP/checkpoint` = msgpack of {"version": 3, "optimizer": {"target": ..., "state": ...}} encoded as
    flax.serialization does (ndarray -> ext type 1 holding msgpack (shape, dtype name, C bytes); arrays over the
    chunk limit -> {"__msgpack_chunked_array__": True, "shape": {...}, "chunks": {...}}) -- checked against
    flax/serialization.py (`_ndarray_to_bytes`, `_msgpack_ext_pack`, `_chunk`, `msgpack_serialize`);
  * partitioned arrays written with tensorstore exactly as `Checkpointer._write_array` does (zarr driver, gzip
    compressor, `_choose_chunk_shape` chunks, kvstore path = the '/'-joined name with '.' separators, relative to
    the checkpoint dir), the msgpack holding `ts.Spec(spec).to_json()` in their place (orbax's
    `register_ts_spec_for_serialization`); the GCS form (gcs driver, dummy bucket, top-level path) as written for
    gs:// checkpoint dirs.
Not verified against a real OpenMoE checkpoint (none is reachable here): which arrays T5X kept inline (we keep the
norm scales inline, as unpartitioned params would be) and the exact Adafactor state layout (ignored by the converter).
The T5X names and orientations come from hpcaitech/ColossalAI examples/language/openmoe/model/convert_openmoe_ckpt.py.
"""

from __future__ import annotations

import json
import os

import msgpack
import numpy as np
import pytest
import tensorstore as ts
import torch

from openmoe import OpenMoeForCausalLM, preset
from openmoe.config import MODEL_CODE_FILES
from openmoe.convert.__main__ import main as convert_main
from openmoe.io.hf import SAFE_INDEX


# --- our weights under T5X names, Flax orientation (the inverse of the published conversion, written out) ---
def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def t5x_params_from_model(model: OpenMoeForCausalLM) -> dict[str, np.ndarray]:
    """{T5X name under target/: array}. Dense kernels [in, out] (transposed), experts [E, in, out] as they are."""
    sd = {k: _np(v) for k, v in model.state_dict().items()}
    t = {"token_embedder/embedding": sd["model.embed_tokens.weight"],
         "decoder/decoder_norm/scale": sd["model.norm.weight"],
         "decoder/logits_dense/kernel": sd["lm_head.weight"].T}
    for i, layer in enumerate(model.model.layers):
        p, d = f"model.layers.{i}.", f"decoder/layers_{i}/"
        t[d + "pre_self_attention_layer_norm/scale"] = sd[p + "input_layernorm.weight"]
        for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
            t[d + f"self_attention/{theirs}/kernel"] = sd[p + f"self_attn.{ours}_proj.weight"].T
        t[d + "pre_mlp_layer_norm/scale"] = sd[p + "post_attention_layernorm.weight"]
        dense_prefix = "extra_mlp" if layer.is_moe else "mlp"
        if layer.is_moe:
            t[d + "mlp/router/router_weights/w/kernel"] = sd[p + "mlp.gate_weight"].T
            t[d + "mlp/expert/wi_0/kernel"] = sd[p + "mlp.experts.wi_gate"]
            t[d + "mlp/expert/wi_1/kernel"] = sd[p + "mlp.experts.wi_up"]
            t[d + "mlp/expert/wo/kernel"] = sd[p + "mlp.experts.wo"]
            t[d + "pre_extra_mlp_layer_norm/scale"] = sd[p + "pre_extra_mlp_layernorm.weight"]
        t[d + f"{dense_prefix}/wi_0/kernel"] = sd[p + f"{dense_prefix}.gate_proj.weight"].T
        t[d + f"{dense_prefix}/wi_1/kernel"] = sd[p + f"{dense_prefix}.up_proj.weight"].T
        t[d + f"{dense_prefix}/wo/kernel"] = sd[p + f"{dense_prefix}.down_proj.weight"].T
    return {k: np.ascontiguousarray(v) for k, v in t.items()}


# --- the T5X on-disk format ---
def choose_chunk_shape(write_shape, target_elements: int) -> list[int]:
    """t5x.checkpoints._choose_chunk_shape: divisors of each dim, greedily shrinking the largest."""
    dim_factors = [[i for i in range(1, size + 1) if size % i == 0] for size in write_shape]
    while np.prod([f[-1] for f in dim_factors]) > target_elements:
        largest = max(range(len(dim_factors)), key=lambda i: dim_factors[i][-1])
        dim_factors[largest].pop()
    return [f[-1] for f in dim_factors]


def _flax_ext_pack(x):
    """flax.serialization._msgpack_ext_pack."""
    if isinstance(x, np.ndarray):
        return msgpack.ExtType(1, msgpack.packb((x.shape, x.dtype.name, x.tobytes("C")), use_bin_type=True))
    if isinstance(x, np.generic):
        return msgpack.ExtType(3, msgpack.packb(((), x.dtype.name, np.asarray(x).tobytes("C")), use_bin_type=True))
    raise TypeError(f"cannot serialize {type(x)}")


def flax_chunked(arr: np.ndarray, chunk_bytes: int) -> dict:
    """flax.serialization._chunk (flax uses chunk_bytes = 2**30)."""
    size = max(1, chunk_bytes // arr.dtype.itemsize)
    flat = arr.reshape(-1)
    return {"__msgpack_chunked_array__": True, "shape": {str(i): s for i, s in enumerate(arr.shape)},
            "chunks": {str(j): flat[i:i + size] for j, i in enumerate(range(0, flat.size, size))}}


def _write_tensorstore(directory: str, name: str, arr: np.ndarray, chunk_elements: int, gcs: bool) -> dict:
    """Checkpointer._get_param_info + _write_array: returns the spec JSON the msgpack holds instead of the array."""
    rel = name.replace("/", ".")
    metadata = {"compressor": {"id": "gzip"}, "shape": list(arr.shape),
                "chunks": choose_chunk_shape(arr.shape, chunk_elements)}
    if gcs:
        spec = {"driver": "zarr", "dtype": arr.dtype.name, "kvstore": {"driver": "gcs", "bucket": "t5x-dummy-bucket"},
                "path": rel, "metadata": metadata}
    else:
        spec = {"driver": "zarr", "dtype": arr.dtype.name, "kvstore": {"driver": "file", "path": rel},
                "metadata": metadata}
    local = {"driver": "zarr", "dtype": arr.dtype.name, "metadata": metadata,
             "kvstore": {"driver": "file", "path": os.path.join(directory, rel)}}
    ts.open(local, create=True, open=True).result().write(arr).result()
    return ts.Spec(spec).to_json()


def write_t5x_checkpoint(params: dict[str, np.ndarray], directory: str, *, step: int = 100, gcs: bool = False,
                         inline=lambda name: name.endswith("/scale"), chunked_inline=(),
                         chunk_elements: int = 1000) -> str:
    """Write `params` (T5X names under target/) as T5X's checkpoint_STEP directory; returns its path.

    inline(name): kept in the msgpack (unpartitioned params); the rest go to zarr. chunked_inline: names stored
    inline in flax's chunked form. chunk_elements: zarr chunk target (T5X uses 64 MiB; small here so that arrays
    span several chunk files).
    """
    ckpt = os.path.join(directory, f"checkpoint_{step}")
    os.makedirs(ckpt, exist_ok=True)
    target: dict = {}
    for name, arr in params.items():
        if name in chunked_inline:
            leaf = flax_chunked(arr, chunk_bytes=4096)
        elif inline(name):
            leaf = arr
        else:
            leaf = _write_tensorstore(ckpt, "target/" + name, arr, chunk_elements, gcs)
        node = target
        *parents, last = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf
    # a slice of an Adafactor state, as t5x stores it beside the target: the converter must ignore it
    qname = "decoder/layers_0/self_attention/query/kernel"
    q = params[qname]
    state = {"step": np.asarray(step, dtype=np.int32), "param_states": {"decoder": {"layers_0": {"self_attention": {
        "query": {"kernel": {
            "v_row": _write_tensorstore(ckpt, "state/param_states/" + qname + "/v_row",
                                        np.ones(q.shape[0], np.float32), chunk_elements, gcs),
            "v_col": _write_tensorstore(ckpt, "state/param_states/" + qname + "/v_col",
                                        np.ones(q.shape[1], np.float32), chunk_elements, gcs),
            "v": np.zeros((1,), np.float32), "m": np.zeros((1,), np.float32)}}}}}}}
    tree = {"version": 3, "optimizer": {"target": target, "state": state}}
    with open(os.path.join(ckpt, "checkpoint"), "wb") as f:
        f.write(msgpack.packb(tree, default=_flax_ext_pack, strict_types=True))
    return ckpt


# --- tests ---
def _tiny_model(seed: int = 0) -> OpenMoeForCausalLM:
    torch.manual_seed(seed)
    return OpenMoeForCausalLM(preset("tiny")).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, attention_mask=torch.ones_like(ids)).logits


def test_t5x_checkpoint_converts_to_identical_logits(tmp_path):
    model = _tiny_model()
    ckpt = write_t5x_checkpoint(t5x_params_from_model(model), str(tmp_path / "t5x"))
    assert os.path.isdir(os.path.join(ckpt, "target.decoder.layers_0.self_attention.query.kernel"))
    assert os.path.isfile(os.path.join(ckpt, "target.decoder.layers_1.mlp.expert.wi_0.kernel", ".zarray"))
    out = tmp_path / "hf"
    assert convert_main(["t5x", "--checkpoint", ckpt, "--config", "tiny", "--output", str(out), "--dtype", "fp32",
                         "--max_shard_size", "200KB"]) == 0

    index = json.load(open(out / SAFE_INDEX))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[-1] == f"model-{len(files):05d}-of-{len(files):05d}.safetensors"
    assert sorted(os.listdir(out)) == sorted(files + [SAFE_INDEX, "config.json", *MODEL_CODE_FILES])  # + model code
    assert set(index["weight_map"]) == set(model.state_dict())
    for fname in files:  # a shard only exceeds the limit when it holds a single larger tensor
        keys = [k for k, f in index["weight_map"].items() if f == fname]
        assert os.path.getsize(out / fname) <= 200_000 + 4096 or len(keys) == 1

    converted = OpenMoeForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(2, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_logits(converted, ids), _logits(model, ids))
    for k, v in model.state_dict().items():
        assert torch.equal(converted.state_dict()[k], v), k


def test_bf16_checkpoint_with_gcs_specs_and_chunked_inline_array(tmp_path, monkeypatch):
    import openmoe.convert.t5x as t5x

    monkeypatch.setattr(t5x, "_BLOCK_BYTES", 4096)  # many chunk-aligned blocks per tensor, as for real sizes
    model = _tiny_model(seed=3).to(torch.bfloat16)
    ckpt = write_t5x_checkpoint(t5x_params_from_model(model), str(tmp_path / "t5x"), gcs=True,
                                chunked_inline=("token_embedder/embedding",))
    spec = msgpack.unpackb(open(os.path.join(ckpt, "checkpoint"), "rb").read(), raw=False, ext_hook=lambda c, d: None)
    leaf = spec["optimizer"]["target"]["decoder"]["layers_0"]["self_attention"]["query"]["kernel"]
    assert leaf["kvstore"]["driver"] == "gcs" and leaf["dtype"] == "bfloat16"

    assert convert_main(["t5x", "--checkpoint", ckpt, "--config", "tiny", "--output", str(tmp_path / "bf16")]) == 0
    kept = OpenMoeForCausalLM.from_pretrained(str(tmp_path / "bf16"))
    for k, v in model.state_dict().items():
        assert kept.state_dict()[k].dtype == torch.bfloat16 and torch.equal(kept.state_dict()[k], v), k

    assert convert_main(["t5x", "--checkpoint", os.path.join(ckpt, "checkpoint"), "--config", "tiny",
                         "--output", str(tmp_path / "fp32"), "--dtype", "fp32"]) == 0
    wide = OpenMoeForCausalLM.from_pretrained(str(tmp_path / "fp32"))
    for k, v in model.state_dict().items():
        assert wide.state_dict()[k].dtype == torch.float32 and torch.equal(wide.state_dict()[k], v.float()), k


def test_unknown_and_missing_names_are_all_listed(tmp_path, capsys):
    params = t5x_params_from_model(_tiny_model())
    params["decoder/layers_0/self_attention/bogus/kernel"] = np.zeros((4, 4), np.float32)
    params["encoder/layers_0/mlp/wo/kernel"] = np.zeros((4, 4), np.float32)
    del params["decoder/logits_dense/kernel"]
    del params["decoder/layers_3/mlp/expert/wo/kernel"]
    ckpt = write_t5x_checkpoint(params, str(tmp_path / "t5x"))
    out = tmp_path / "hf"
    assert convert_main(["t5x", "--checkpoint", ckpt, "--config", "tiny", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert ("unknown T5X names ['decoder/layers_0/self_attention/bogus/kernel', 'encoder/layers_0/mlp/wo/kernel']"
            in err), err
    assert "missing T5X names ['decoder/layers_3/mlp/expert/wo/kernel', 'decoder/logits_dense/kernel']" in err, err
    assert not out.exists()


def test_decoder_owned_embedder_spelling_is_accepted(tmp_path):
    model = _tiny_model(seed=5)
    params = t5x_params_from_model(model)
    params["decoder/token_embedder/embedding"] = params.pop("token_embedder/embedding")
    ckpt = write_t5x_checkpoint(params, str(tmp_path / "t5x"))
    assert convert_main(["t5x", "--checkpoint", ckpt, "--config", "tiny", "--output", str(tmp_path / "hf")]) == 0
    converted = OpenMoeForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert torch.equal(converted.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_config_mismatch_is_reported_before_writing(tmp_path, capsys):
    ckpt = write_t5x_checkpoint(t5x_params_from_model(_tiny_model()), str(tmp_path / "t5x"))
    cfg = preset("tiny", intermediate_size=64)
    cfg.save(str(tmp_path / "cfg"))
    out = tmp_path / "hf"
    assert convert_main(["t5x", "--checkpoint", ckpt, "--config", str(tmp_path / "cfg" / "config.json"),
                         "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "wrong shapes" in err and "decoder/layers_0/mlp/wi_0/kernel (64, 256) -> model.layers.0.mlp.gate_proj" \
        ".weight (256, 64) vs model (128, 64)" in err, err
    assert convert_main(["t5x", "--checkpoint", ckpt, "--config", "tiny-ish", "--output", str(out)]) == 2
    assert "--config 'tiny-ish' is neither a preset" in capsys.readouterr().err
    assert convert_main(["t5x", "--checkpoint", str(tmp_path), "--config", "tiny", "--output", str(out)]) == 2
    assert "no T5X checkpoint at" in capsys.readouterr().err
    assert not out.exists()


def test_blocks_follow_zarr_chunks():
    from openmoe.convert.t5x import block_shape

    # T5X chunks a [H, V] logits kernel along V: blocks must not cut across chunks in H
    assert block_shape((512, 65536), (512, 32768), 4, 64 * 2**20) == (512, 32768)
    assert block_shape((4, 64, 256), (1, 8, 256), 4, 64 * 1024) == (1, 64, 256)  # merged up to the limit
    assert block_shape((16, 12), (3, 4), 4, 40) == (3, 4)  # never below one chunk


@pytest.mark.parametrize("text,expected", [("2GB", 2 * 10**9), ("500MB", 5 * 10**8), ("64KiB", 65536), ("123", 123)])
def test_parse_size(text, expected):
    from openmoe.convert.t5x import parse_size

    assert parse_size(text) == expected
