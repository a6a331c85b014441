"""Convert an original OpenMoE T5X checkpoint (JAX/flaxformer) to our HF format, without t5x, jax or flax.

    python -m openmoe.convert t5x --checkpoint /ckpt/openmoe-8b/checkpoint_100000 --config 8b \
        --output /ckpt/openmoe-8b-hf
    python -m openmoe.convert t5x --checkpoint DIR --config path/config.json --output DIR --dtype bf16

Shapes: H hidden, I intermediate, E experts, V vocabulary, N*D attention width (heads x head_dim).

The on-disk format, as t5x/checkpoints.py writes it (`Checkpointer.save`, VERSION 3; read in XueFuzhao/t5x, the fork
OpenMoE was trained with, and google-research/t5x):
  * `DIR/checkpoint`: flax.serialization msgpack of {"version": 3, "optimizer": {"target": params, "state": ...}}
    (version 0 = a plain flax tree holding "target" directly). Arrays that were not partitioned are inline as msgpack
    ext type 1 (payload: msgpack of (shape, dtype name, C-order bytes)); arrays over 2**30 bytes are split into
    {"__msgpack_chunked_array__": True, "shape": {...}, "chunks": {...}} dicts (flax's `_chunk`).
  * every partitioned array is replaced by its tensorstore spec (`ts.Spec.to_json()`): {"driver": "zarr", "dtype",
    "kvstore": {"driver": "file" | "gcs", "path": "target.decoder.layers_0.self_attention.query.kernel", ...},
    "metadata": {"chunks", "compressor": {"id": "gzip"}, "shape"}} whose path is relative to DIR (older specs keep
    "path" at the top level); the zarr v2 array (`.zarray` + gzip chunk files) lies in that folder. Checkpoints
    written to GCS name the "gcs" driver with a dummy bucket; like t5x's `_maybe_update_ts_from_gcs_to_file`, we read
    the same relative path from local disk.
The optimizer state ("state": Adafactor moments, step) is ignored: only "target" holds the model.

Memory: tensors are planned from the msgpack tree alone (names, shapes, all errors raised before anything is read),
then streamed in our state-dict order: each is read from zarr in blocks of whole chunks (<= 64 MiB unless one chunk
is larger; T5X writes 64 MiB chunks) straight into its output tensor, and a safetensors shard is written out before
the next tensor would push it past --max_shard_size. Peak RAM is about max(shard size, largest tensor) plus ~3 chunks
in flight (compressed bytes, decoded chunk, block copy), never the whole model.

A T5X checkpoint holds no tokenizer: --tokenizer (the umT5 sentencepiece model or a tokenizer directory) is written
into the export with OpenMoE's conventions, as the trainer's export does. An existing non-empty --output needs
--overwrite (convert/output.py).
"""

from __future__ import annotations

import itertools
import os
import re

import numpy as np
import torch

from openmoe.config import CONFIG_NAME, PRESETS, OpenMoeConfig, preset
from openmoe.convert.output import (
    add_output_arguments,
    add_tokenizer_argument,
    check_output,
    no_tokenizer_note,
    source_tokenizer,
)
from openmoe.io.hf import ShardWriter, atomic_directory, parse_dtype, write_tokenizer

COPY, TRANSPOSE = "copy", "transpose"

# T5X name (under `target/`) -> our state-dict key, and how the array turns into our tensor; {i} is the layer index.
# Source: the published OpenMoE T5X -> PyTorch conversion, hpcaitech/ColossalAI
# examples/language/openmoe/model/convert_openmoe_ckpt.py (`convert_t5x_to_pytorch`; also used to produce the
# hub checkpoints, e.g. its openmoe-8b-chat command). Flax DenseGeneral kernels are stored 2-D [in, out] (flaxformer
# reshapes (N, D) features to N*D), so they are transposed to nn.Linear's [out, in]; the router kernel [H, E] likewise
# becomes gate_weight [E, H]. Expert kernels are vmapped MlpBlocks stored [E, in, out], our layout as is.
# wi_0 is the 2I-wide gated projection (gate_proj / experts.wi_gate), wi_1 the I-wide one (up_proj / experts.wi_up):
# the shapes confirm the source's assignment.
# Whether a row applies to layer i (dense vs MoE) is decided by our model: a row is expected where its key exists in
# OpenMoeForCausalLM(config)'s state dict, so the config's moe_layer_interval picks the MoE rows.
T5X_TO_OPENMOE: list[tuple[str, str, str]] = [
    ("token_embedder/embedding", "model.embed_tokens.weight", COPY),  # [V, H]
    ("decoder/layers_{i}/pre_self_attention_layer_norm/scale", "model.layers.{i}.input_layernorm.weight", COPY),
    ("decoder/layers_{i}/self_attention/query/kernel", "model.layers.{i}.self_attn.q_proj.weight", TRANSPOSE),
    ("decoder/layers_{i}/self_attention/key/kernel", "model.layers.{i}.self_attn.k_proj.weight", TRANSPOSE),
    ("decoder/layers_{i}/self_attention/value/kernel", "model.layers.{i}.self_attn.v_proj.weight", TRANSPOSE),
    ("decoder/layers_{i}/self_attention/out/kernel", "model.layers.{i}.self_attn.o_proj.weight", TRANSPOSE),
    ("decoder/layers_{i}/pre_mlp_layer_norm/scale", "model.layers.{i}.post_attention_layernorm.weight", COPY),
    # dense layers
    ("decoder/layers_{i}/mlp/wi_0/kernel", "model.layers.{i}.mlp.gate_proj.weight", TRANSPOSE),  # [H, 2I]
    ("decoder/layers_{i}/mlp/wi_1/kernel", "model.layers.{i}.mlp.up_proj.weight", TRANSPOSE),  # [H, I]
    ("decoder/layers_{i}/mlp/wo/kernel", "model.layers.{i}.mlp.down_proj.weight", TRANSPOSE),  # [I, H]
    # MoE layers: router, stacked experts, then the extra dense MLP with its own pre-norm
    ("decoder/layers_{i}/mlp/router/router_weights/w/kernel", "model.layers.{i}.mlp.gate_weight", TRANSPOSE),  # [H, E]
    ("decoder/layers_{i}/mlp/expert/wi_0/kernel", "model.layers.{i}.mlp.experts.wi_gate", COPY),  # [E, H, 2I]
    ("decoder/layers_{i}/mlp/expert/wi_1/kernel", "model.layers.{i}.mlp.experts.wi_up", COPY),  # [E, H, I]
    ("decoder/layers_{i}/mlp/expert/wo/kernel", "model.layers.{i}.mlp.experts.wo", COPY),  # [E, I, H]
    ("decoder/layers_{i}/pre_extra_mlp_layer_norm/scale", "model.layers.{i}.pre_extra_mlp_layernorm.weight", COPY),
    ("decoder/layers_{i}/extra_mlp/wi_0/kernel", "model.layers.{i}.extra_mlp.gate_proj.weight", TRANSPOSE),
    ("decoder/layers_{i}/extra_mlp/wi_1/kernel", "model.layers.{i}.extra_mlp.up_proj.weight", TRANSPOSE),
    ("decoder/layers_{i}/extra_mlp/wo/kernel", "model.layers.{i}.extra_mlp.down_proj.weight", TRANSPOSE),
    ("decoder/decoder_norm/scale", "model.norm.weight", COPY),
    ("decoder/logits_dense/kernel", "lm_head.weight", TRANSPOSE),  # [H, V]: untied LM head
]
# Our decision where the source is ambiguous: it reads the embedding at `target/token_embedder` (a shared embedder
# beside the decoder), while flaxformer's plain DecoderOnly keeps the decoder's own embedder at
# `decoder/token_embedder`. Both spellings are accepted; a checkpoint holding both is refused.
T5X_ALIASES = {"decoder/token_embedder/embedding": "token_embedder/embedding"}

_BLOCK_BYTES = 64 * 1024**2  # rows read from zarr at a time (T5X chunks hold 64 MiB too)


# --- the msgpack tree (flax.serialization's encoding, decoded with the plain msgpack package) ---
def _dtype_from_name(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # numpy's bfloat16, installed with tensorstore

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _ndarray_from_bytes(data: bytes) -> np.ndarray:
    import msgpack

    shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    return np.frombuffer(buffer, dtype=_dtype_from_name(dtype_name.decode())).reshape(shape, order="C")


def _ext_hook(code: int, data: bytes):
    import msgpack

    if code == 1:  # ndarray
        return _ndarray_from_bytes(data)
    if code == 3:  # numpy scalar
        return _ndarray_from_bytes(data)[()]
    if code == 2:  # complex
        real, imag = msgpack.unpackb(data)
        return complex(real, imag)
    return msgpack.ExtType(code, data)


def _unchunk(tree):
    """Undo flax's splitting of > 2**30-byte arrays into flat chunks."""
    if isinstance(tree, dict):
        if "__msgpack_chunked_array__" in tree:
            shape = tuple(tree["shape"][str(i)] for i in range(len(tree["shape"])))
            chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
            return np.concatenate(chunks).reshape(shape)
        return {k: _unchunk(v) for k, v in tree.items()}
    return tree


def read_msgpack_tree(checkpoint_dir: str) -> dict:
    """The whole `checkpoint` msgpack file as a nested dict (small: big arrays are only tensorstore specs)."""
    import msgpack

    path = os.path.join(checkpoint_dir, "checkpoint")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no T5X checkpoint at {checkpoint_dir}: expected the msgpack file {path} "
                                "(give --checkpoint the checkpoint_STEP directory)")
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(b"model_checkpoint_path"):
        raise ValueError(f"{path} is a TensorFlow checkpoint index, not a native T5X (msgpack) checkpoint")
    return _unchunk(msgpack.unpackb(raw, ext_hook=_ext_hook, raw=False))


def _is_ts_spec(leaf) -> bool:
    # t5x's own test for a tensorstore placeholder (`_maybe_update_ts_from_gcs_to_file._is_leaf`)
    return isinstance(leaf, dict) and set(leaf) >= {"driver", "kvstore", "metadata"}


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and not _is_ts_spec(v):
            out.update(_flatten(v, name + "/"))
        else:
            out[name] = v
    return out


def target_params(tree: dict) -> dict[str, object]:
    """Flattened `target` (the model parameters): name -> inline ndarray or tensorstore spec dict."""
    version = tree.get("version", 0)
    state = tree.get("optimizer") if version else tree
    if not isinstance(state, dict) or "target" not in state:
        raise ValueError(f"T5X checkpoint (version {version}) has no 'target' parameter tree; top-level keys: "
                         f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
    return _flatten(state["target"])


# --- one array: inline or in zarr, read in blocks aligned to its zarr chunks ---
def block_shape(shape: tuple, chunk: tuple, itemsize: int, limit: int) -> tuple:
    """Whole zarr chunks, merged (last axis first, so blocks stay contiguous) while a block holds <= limit bytes.

    Reading along chunk boundaries means tensorstore decodes every chunk once: T5X's `_choose_chunk_shape` splits the
    largest axis first, so a [H, V] logits kernel is chunked along V and row blocks would decode each chunk again.
    """
    block = list(chunk)
    for ax in reversed(range(len(shape))):
        others = itemsize * int(np.prod(block[:ax] + block[ax + 1:]))
        chunks_fit = max(1, limit // max(1, others * chunk[ax]))
        block[ax] = min(shape[ax], chunks_fit * chunk[ax])
    return tuple(block)


class T5XArray:
    def __init__(self, leaf, checkpoint_dir: str, name: str):
        self.name = name
        self._store = self._array = None
        if _is_ts_spec(leaf):
            import tensorstore as ts

            rel = leaf["kvstore"].get("path") or leaf.get("path")
            if not rel:
                raise ValueError(f"tensorstore spec of {name} has no path: {leaf}")
            # local copy of a checkpoint written to file or GCS: the array folder is relative to the checkpoint dir
            spec = {"driver": leaf["driver"], "kvstore": {"driver": "file", "path": os.path.join(checkpoint_dir, rel)}}
            try:
                self._store = ts.open(spec, open=True, read=True).result()
            except Exception as e:  # tensorstore raises ValueError/OSError subclasses with its own messages
                raise FileNotFoundError(f"cannot open the zarr array of {name} at {spec['kvstore']['path']}: "
                                        f"{e}") from None
            self.shape, self.dtype = tuple(self._store.shape), np.dtype(self._store.dtype.numpy_dtype)
            self.chunk = tuple(self._store.chunk_layout.read_chunk.shape)
        elif isinstance(leaf, (np.ndarray, np.generic)):
            self._array = leaf = np.asarray(leaf)
            self.shape, self.dtype, self.chunk = leaf.shape, leaf.dtype, leaf.shape  # already in memory: one block
        else:
            raise ValueError(f"T5X parameter {name} is neither an array nor a tensorstore spec: {type(leaf).__name__}")

    def blocks(self, limit: int):
        """Yield (index: tuple of slices, values at that index) covering the array."""
        block = block_shape(self.shape, self.chunk, self.dtype.itemsize, limit)
        starts = itertools.product(*(range(0, n, b) for n, b in zip(self.shape, block)))
        for start in starts:
            idx = tuple(slice(s, min(s + b, n)) for s, b, n in zip(start, block, self.shape))
            yield idx, (self._store[idx].read().result() if self._store is not None else self._array[idx])


def _to_torch(a: np.ndarray) -> torch.Tensor:
    a = np.array(a, copy=True, order="C") if not (a.flags.c_contiguous and a.flags.writeable) else a
    if a.dtype.name == "bfloat16":  # torch cannot take ml_dtypes' bfloat16: reinterpret the bits
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    if a.dtype not in (np.float32, np.float16):
        raise ValueError(f"T5X array dtype {a.dtype} is not supported; accepted: float32, bfloat16, float16")
    return torch.from_numpy(a)


def _torch_dtype(np_dtype: np.dtype) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[np_dtype.name]


def convert_tensor(src: T5XArray, transform: str, dtype: torch.dtype) -> torch.Tensor:
    """Read `src` block by block into one output tensor of our orientation (and dtype)."""
    out = torch.empty(src.shape[::-1] if transform == TRANSPOSE else src.shape, dtype=dtype)
    for idx, values in src.blocks(_BLOCK_BYTES):
        block = _to_torch(values)
        if transform == TRANSPOSE:
            out[idx[::-1]].copy_(block.T)  # kernel [in, out] block -> the same block of weight [out, in]
        else:
            out[idx].copy_(block)
    return out


# --- planning: names and shapes checked before any data is read ---
def expected_names(config: OpenMoeConfig) -> dict[str, tuple[str, str, tuple]]:
    """T5X name -> (our key, transform, our shape) for every tensor our model has, in state-dict order."""
    from openmoe.model import OpenMoeForCausalLM

    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in OpenMoeForCausalLM(config, init=False).state_dict().items()}
    by_key = {}
    for t5x_tpl, key_tpl, transform in T5X_TO_OPENMOE:
        layers = range(config.num_hidden_layers) if "{i}" in key_tpl else [None]
        for i in layers:
            key = key_tpl.format(i=i)
            if key in ours:
                by_key[key] = (t5x_tpl.format(i=i), transform)
    unmapped = sorted(set(ours) - set(by_key))
    assert not unmapped, f"T5X_TO_OPENMOE lacks rows for {unmapped}"  # internal: the table covers the model
    return {by_key[k][0]: (k, by_key[k][1], shape) for k, shape in ours.items()}


def plan(params: dict[str, object], config: OpenMoeConfig, checkpoint_dir: str) -> list[tuple[str, str, T5XArray]]:
    """[(our key, transform, source)] in our state-dict order; one ValueError naming every problem otherwise."""
    names = {}
    for name, leaf in params.items():
        canonical = T5X_ALIASES.get(name, name)
        if canonical in names:
            raise ValueError(f"T5X checkpoint holds both {canonical} and its alias {name}; keep one")
        names[canonical] = (name, leaf)
    expected = expected_names(config)
    unknown = sorted(names[n][0] for n in set(names) - set(expected))
    missing = sorted(set(expected) - set(names))
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown T5X names {unknown}")
        if missing:
            parts.append(f"missing T5X names {missing}")
        raise ValueError(
            f"T5X checkpoint {checkpoint_dir} does not match the config (num_hidden_layers={config.num_hidden_layers}, "
            f"moe_layer_interval={config.moe_layer_interval}): " + "; ".join(parts)
            + " (names under target/; check --config)")
    out, wrong = [], []
    for t5x_name, (key, transform, shape) in expected.items():
        src = T5XArray(names[t5x_name][1], checkpoint_dir, names[t5x_name][0])
        if transform == TRANSPOSE and len(src.shape) != 2:
            wrong.append(f"{t5x_name}: {src.shape} is not a 2-D kernel")
            continue
        got = src.shape[::-1] if transform == TRANSPOSE else src.shape
        if tuple(got) != tuple(shape):
            wrong.append(f"{t5x_name} {tuple(src.shape)} -> {key} {tuple(got)} vs model {tuple(shape)}")
        out.append((key, transform, src))
    if wrong:
        raise ValueError(f"T5X checkpoint {checkpoint_dir} has wrong shapes for the config: [{'; '.join(wrong)}]")
    return out


# --- output: safetensors shards written as they fill ---
# --- CLI ---
def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"--max_shard_size '{text}' is not a size; accepted e.g. 2GB, 500MB, 64KiB, 1000000")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def load_config(spec: str) -> OpenMoeConfig:
    if spec in PRESETS:
        return preset(spec)
    if os.path.isfile(spec) or os.path.isfile(os.path.join(spec, CONFIG_NAME)):
        return OpenMoeConfig.load(spec)
    raise ValueError(f"--config '{spec}' is neither a preset {sorted(PRESETS)} nor a config.json file or directory")


def convert(checkpoint: str, config: OpenMoeConfig, output: str, dtype: str | None = None,
            max_shard_bytes: int = 2 * 10**9, overwrite: bool = False, tokenizer: str | None = None) -> list[str]:
    """Convert; returns the shard file names written under `output`. overwrite: replace an existing non-empty
    `output`; tokenizer: the export's tokenizer (a path or hub id; default: one in the checkpoint directory, if any)."""
    checkpoint = os.path.abspath(checkpoint)
    if os.path.basename(checkpoint) == "checkpoint" and os.path.isfile(checkpoint):
        checkpoint = os.path.dirname(checkpoint)
    out_dtype = parse_dtype(dtype)
    if out_dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"--dtype '{dtype}' is not supported; accepted: bf16, fp32 (default: as stored)")
    check_output(output, overwrite, (checkpoint, tokenizer))
    tok = source_tokenizer(config, checkpoint, tokenizer)
    tensors = plan(target_params(read_msgpack_tree(checkpoint)), config, checkpoint)
    with atomic_directory(output) as tmp:
        if tok is not None:
            config = write_tokenizer(tmp, config, tok)
        config.save(tmp)
        writer = ShardWriter(tmp, max_shard_bytes)
        for key, transform, src in tensors:
            dt = out_dtype or _torch_dtype(src.dtype)
            writer.reserve(int(np.prod(src.shape)) * torch.finfo(dt).bits // 8)  # flush before allocating
            writer.add(key, convert_tensor(src, transform, dt))
        files = writer.finish()
    print(f"converted {len(tensors)} tensors ({writer.total_bytes / 1e9:.2f} GB) from {checkpoint} into "
          f"{len(files)} shard(s) under {output}")
    if tok is None:
        print(no_tokenizer_note(output, checkpoint, "--checkpoint"))
    return files


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("t5x", help="original OpenMoE T5X checkpoint (msgpack + zarr) -> HF-format safetensors",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="T5X checkpoint_STEP directory (holding the msgpack "
                                                       "`checkpoint` file and the zarr array folders)")
    p.add_argument("--config", required=True, help=f"architecture: a preset {sorted(PRESETS)} or a config.json "
                                                    "(file or directory), e.g. the published model's")
    add_output_arguments(p, "HF-format")
    add_tokenizer_argument(p, "--checkpoint")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="output dtype; default: as stored in the checkpoint")
    p.add_argument("--max_shard_size", default="2GB", help="largest safetensors shard, e.g. 2GB, 500MB (default 2GB)")
    p.set_defaults(func=_run)


def _run(args) -> None:
    convert(args.checkpoint, load_config(args.config), args.output, args.dtype, parse_size(args.max_shard_size),
            args.overwrite, args.tokenizer)
