"""HF-format checkpoints: config.json + safetensors (sharded with an index) written by us; the published
`pytorch_model.bin[.index.json]` layout read as well. Single-device; the trainer gathers expert-parallel shards into
full tensors before calling `save_pretrained` and slices after `read_tensors`.

Every directory is written atomically: files go to a temporary sibling, are fsynced, and the directory is renamed
into place, so a save killed halfway never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from openmoe.config import OpenMoeConfig

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype '{dtype}' is not supported; accepted: {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file under `path` and every directory holding them."""
    for dirpath, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


def path_within(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or lies below it, symbolic links resolved (what replacing or removing
    `directory` would take with it)."""
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def replace_directory(tmp: str, path: str) -> None:
    """The one commit step of every checkpoint write: move a complete, fsynced `tmp` into place as `path`.

    An existing `path` is first renamed aside (never deleted before the new one is in place), then `tmp` is renamed
    in, the parent directory fsynced, and only then the old copy deleted: a kill at any point leaves either the old
    or the new directory under `path` (or, between the two renames, the old one under a `.old-` sibling)."""
    parent = os.path.dirname(os.path.abspath(path))
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
        os.replace(path, os.path.join(old, "x"))
    os.replace(tmp, path)
    fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def honour_umask(path: str) -> None:
    """Give `path` and everything under it the modes a plain mkdir/open would have (0755 / 0644 under umask 022):
    mkdtemp creates 0700 and some writers 0600, which would hide an export from other users."""
    umask = os.umask(0)
    os.umask(umask)
    for dirpath, _, names in os.walk(path):
        os.chmod(dirpath, 0o777 & ~umask)
        for name in names:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~umask)


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yield a temporary directory; on success replace `path` by it (see replace_directory)."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield tmp
        honour_umask(tmp)
        fsync_tree(tmp)
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ShardWriter:
    """Writes tensors into numbered safetensors shards, flushing before a shard would exceed max_bytes (so a converter
    never holds more than one shard of converted tensors in memory)."""

    def __init__(self, directory: str, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.shards: list[list[str]] = []  # tensor names per written shard
        self.total_bytes = 0

    def reserve(self, nbytes: int) -> None:
        """Call before materialising a tensor of nbytes, so the open shard is written out first if it would overflow."""
        if self.current and self.current_bytes + nbytes > self.max_bytes:
            self.flush()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        self.reserve(nbytes)
        self.current[name] = tensor
        self.current_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.current:
            return
        save_file(self.current, self._tmp_name(len(self.shards)), metadata={"format": "pt"})
        self.shards.append(list(self.current))
        self.current, self.current_bytes = {}, 0

    def _tmp_name(self, i: int) -> str:
        return os.path.join(self.directory, f"shard-{i}.safetensors.partial")

    def finish(self, single_file: bool = False) -> list[str]:
        """Name the shards model-0000i-of-0000n.safetensors and write the index; returns the file names.
        single_file: one shard is written as model.safetensors without an index (what HF's save_pretrained does)."""
        self.flush()
        if single_file and len(self.shards) <= 1:
            if not self.shards:  # an empty state dict still gets its (empty) weights file
                save_file({}, self._tmp_name(0), metadata={"format": "pt"})
            os.replace(self._tmp_name(0), os.path.join(self.directory, SAFE_WEIGHTS))
            return [SAFE_WEIGHTS]
        n = len(self.shards)
        weight_map, files = {}, []
        for i, names in enumerate(self.shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self._tmp_name(i), os.path.join(self.directory, fname))
            weight_map.update({name: fname for name in names})
            files.append(fname)
        with open(os.path.join(self.directory, SAFE_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)
        return files


def write_checkpoint(directory: str, config: OpenMoeConfig, state_dict: dict[str, torch.Tensor],
                     max_shard_bytes: int = 2 * 1024**3, tokenizer=None) -> None:
    """Write config.json (auto_map) + the model code + safetensors (sharded with an index when larger than
    max_shard_bytes) atomically: the directory loads with AutoModelForCausalLM.from_pretrained(dir,
    trust_remote_code=True) where openmoe is not installed. With `tokenizer`, its files are written into the same
    atomic directory (write_tokenizer). An existing `directory` is replaced, as the trainer's OUT/hf re-export needs
    (the converters refuse an occupied --output themselves: convert/output.py)."""
    with atomic_directory(directory) as tmp:
        if tokenizer is not None:
            config = write_tokenizer(tmp, config, tokenizer)
        config.save(tmp)
        writer = ShardWriter(tmp, max_shard_bytes)
        for name, t in state_dict.items():
            writer.add(name, t.detach().contiguous().cpu())
        writer.finish(single_file=True)


def write_tokenizer(directory: str, config: OpenMoeConfig, tokenizer) -> OpenMoeConfig:
    """Write the tokenizer's export (openmoe.tokenizer.save_tokenizer: what AutoTokenizer needs to encode as training
    did) and a generation_config.json that keeps generate() off the ids past the tokenizer (the embedding is padded:
    256384 rows for umT5's 256300 pieces), as infer.py does. Returns `config` naming the tokenizer class written:
    pipeline("text-generation", model=dir) loads a tokenizer for a remote-code model only when config.json names
    one, so the caller saves the returned config."""
    from transformers import GenerationConfig

    from openmoe.tokenizer import save_tokenizer

    save_tokenizer(tokenizer, directory)
    unused = list(range(len(tokenizer), config.vocab_size))
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id, suppress_tokens=unused or None).save_pretrained(directory)
    with open(os.path.join(directory, "tokenizer_config.json")) as f:
        tokenizer_class = json.load(f).get("tokenizer_class") or type(tokenizer).__name__  # what AutoTokenizer reads
    return config.replace(tokenizer_class=tokenizer_class)


def save_pretrained(model, directory: str, max_shard_bytes: int | None = None, max_shard_size: int | str = "2GB",
                    state_dict: dict | None = None, safe_serialization: bool = True, is_main_process: bool = True,
                    **unsupported) -> None:
    """`model.save_pretrained`: transformers' arguments where they apply (max_shard_size "2GB"/int bytes,
    state_dict, is_main_process); max_shard_bytes is ours (wins over max_shard_size)."""
    if unsupported or not safe_serialization:
        names = sorted(unsupported) + ([] if safe_serialization else ["safe_serialization=False"])
        raise ValueError(f"save_pretrained argument(s) {names} are not supported by openmoe's writer; accepted: "
                         "max_shard_size, max_shard_bytes, state_dict, is_main_process (push with "
                         "huggingface_hub.upload_folder after saving)")
    if not is_main_process:
        return
    limit = max_shard_bytes if max_shard_bytes is not None else parse_size(max_shard_size)
    write_checkpoint(directory, model.config, model.state_dict() if state_dict is None else state_dict, limit)


_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """'2GB' / '500MiB' / bytes -> bytes (transformers' max_shard_size convention)."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    for unit in sorted(_SIZE_UNITS, key=len, reverse=True):
        if text.endswith(unit) and text[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)]) * _SIZE_UNITS[unit])
    raise ValueError(f"max_shard_size '{size}' is not a size; accepted: bytes or e.g. '2GB', '500MB', '1GiB'")


def _weight_files(directory: str) -> tuple[list[str], bool]:
    """(files, is_safetensors) in the order HF looks for them."""
    for index, safe in ((SAFE_INDEX, True), (BIN_INDEX, False)):
        p = os.path.join(directory, index)
        if os.path.isfile(p):
            with open(p) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            missing = [x for x in files if not os.path.isfile(os.path.join(directory, x))]
            if missing:
                raise FileNotFoundError(f"{p} names shard(s) that do not exist: {missing}")
            return [os.path.join(directory, x) for x in files], safe
    for single, safe in ((SAFE_WEIGHTS, True), (BIN_WEIGHTS, False)):
        p = os.path.join(directory, single)
        if os.path.isfile(p):
            return [p], safe
    raise FileNotFoundError(
        f"no weights in {directory}: expected one of {SAFE_INDEX}, {SAFE_WEIGHTS}, {BIN_INDEX}, {BIN_WEIGHTS}")


def read_tensors(directory: str, select: Callable[[str], slice | None | bool] = lambda name: None
                 ) -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint directory.

    select(name) -> False to skip the tensor, None for all of it, or a slice of its first dimension (safetensors
    reads only that slice from disk: an EP rank loads only its experts).
    """
    files, safe = _weight_files(directory)
    out = {}
    for path in files:
        if safe:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    sel = select(name)
                    if sel is False:
                        continue
                    out[name] = f.get_tensor(name) if sel is None else f.get_slice(name)[sel]
        else:
            shard = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for name, t in shard.items():
                sel = select(name)
                if sel is not False:
                    out[name] = t if sel is None else t[sel].clone()
    return out


def check_state_dict(expected: dict[str, torch.Size], got: dict[str, torch.Tensor], source: str) -> None:
    """Raise one clear error listing missing, unexpected and wrongly-shaped keys."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k])}"
                   for k in set(expected) & set(got) if tuple(got[k].shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if extra:
        problems.append(f"unexpected keys {extra}")
    if wrong:
        problems.append(f"wrong shapes [{'; '.join(wrong)}]")
    if problems:
        raise ValueError(f"checkpoint {source} does not match the model: " + "; ".join(problems))


def load_pretrained(directory: str, dtype=None, device="cpu", **kwargs):
    """OpenMoeForCausalLM.from_pretrained (transformers', strict) with our dtype spelling ("bf16", ...)."""
    from openmoe.model import OpenMoeForCausalLM

    return OpenMoeForCausalLM.from_pretrained(directory, torch_dtype=parse_dtype(dtype), **kwargs).to(device)
