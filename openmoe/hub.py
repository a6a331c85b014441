"""Where a model and its tokenizer come from: a local directory, a hub id, or a preset.

    resolve_model("OrionZheng/openmoe-8b")      -> local directory (huggingface_hub.snapshot_download: the HF cache
                                                   under HF_HOME / HF_HUB_CACHE, and HF_HUB_OFFLINE=1 reads only it)
    resolve_model("/ckpt/openmoe-8b")            -> "/ckpt/openmoe-8b" (published layout or ours)
    resolve_model("tiny")                        -> None (a preset: random weights, no directory)
    resolve_model("outputs/tiny-ep")             -> error naming outputs/tiny-ep/hf (a training run's export; a
                                                   checkpoint step-N/ names step-N/model)
    tokenizer_path(model_dir, preset, explicit)  -> what to load: `explicit` if given (a path or hub id), else the
                                                   model directory's own tokenizer files, else the shipped test
                                                   tokenizer for the `tiny` preset only; otherwise one clear error
"""

from __future__ import annotations

import os
import re

from openmoe.config import PRESETS

SHIPPED_TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "assets",
                                 "tokenizer")  # 768 pieces: for the tiny preset only
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "tokenizer.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# what a model needs from a hub repository (not its other formats: flax/tf/onnx weights)
_MODEL_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.py", "*.model", "*.txt"]


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not os.path.exists(name) and not name.startswith(".")


def resolve_model(name: str, revision: str | None = None) -> str | None:
    """A local checkpoint directory for `name` (module docstring); None for a preset name."""
    if os.path.isdir(name):
        check_model_dir(name)
        return name
    if name in PRESETS:
        return None
    if os.path.exists(name):
        raise FileNotFoundError(f"{name} is a file; accepted: a checkpoint directory, a hub id (owner/name) or a "
                                f"preset ({', '.join(sorted(PRESETS))})")
    if not is_hub_id(name):
        raise FileNotFoundError(f"checkpoint directory {name} does not exist; accepted: a directory, a hub id "
                                f"(owner/name) or a preset ({', '.join(sorted(PRESETS))})")
    try:
        return download(name, revision, _MODEL_PATTERNS)
    except HubMiss as e:
        parent = os.path.dirname(name)
        if not os.path.isdir(parent):  # nothing local it could be: the hub's answer alone
            raise FileNotFoundError(f"{str(e).rstrip('.')}; it is not a local directory either") from None
        # `outputs/nope` next to an existing outputs/: most likely a mistyped local path, so that comes first
        raise FileNotFoundError(f"{name} is neither an existing local directory ({parent}/ holds no "
                                f"'{os.path.basename(name)}') nor a hub model id that could be fetched ({e.why})"
                                ) from None


# where train.py puts a loadable model inside its outputs: a run's export (OUT/hf) and a resumable checkpoint's
# weights (OUT/checkpoints/step-N/model)
MODEL_SUBDIRS = ("hf", "model")


def check_model_dir(path: str) -> None:
    """A directory without config.json is no model: one error, naming the model directory inside it when `path` is
    a training run or one of its checkpoints."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    inner = [os.path.join(path, d) for d in MODEL_SUBDIRS if os.path.isfile(os.path.join(path, d, "config.json"))]
    hint = f"; did you mean {inner[0]}?" if inner else "; accepted: a directory holding config.json and the weights"
    raise FileNotFoundError(f"{path} is not a model directory (no config.json){hint}")


class HubMiss(FileNotFoundError):
    """download's one-line error; `why` says it in a few words (offline, unreachable, no such repository)."""

    def __init__(self, message: str, why: str):
        super().__init__(message)
        self.why = why


def download(repo_id: str, revision: str | None, patterns: list[str] | None) -> str:
    """huggingface_hub.snapshot_download with one clear error when the files are neither cached nor reachable."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except (LocalEntryNotFoundError, RepositoryNotFoundError, OSError) as e:
        mode = "offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "online"
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if constants.HF_HUB_OFFLINE:
            why = f"the hub is offline (HF_HUB_OFFLINE=1) and the HF cache {constants.HF_HUB_CACHE} does not hold it"
        elif isinstance(e, RepositoryNotFoundError):
            why = "the hub has no such repository (or it is private: log in or set HF_TOKEN)"
        elif isinstance(e, LocalEntryNotFoundError):  # online, yet the hub did not answer
            why = f"the hub cannot be reached and the HF cache {constants.HF_HUB_CACHE} does not hold it"
        else:
            why = reason
        raise HubMiss(f"hub model '{repo_id}' could not be resolved ({mode}, cache {constants.HF_HUB_CACHE}): "
                      f"{reason}", why) from None


def tokenizer_path(model_dir: str | None, preset: str | None = None, explicit: str | None = None) -> str:
    """What `openmoe.tokenizer.load_tokenizer` should read (module docstring)."""
    if explicit:
        return download(explicit, None, ["*.json", "*.model", "*.txt"]) if is_hub_id(explicit) else explicit
    if model_dir is not None and any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        return model_dir
    if model_dir is None and preset == "tiny":
        return SHIPPED_TOKENIZER
    where = f"model directory {model_dir}" if model_dir is not None else f"preset '{preset}'"
    raise ValueError(f"no tokenizer for {where} (looked for {', '.join(TOKENIZER_FILES)}); pass --tokenizer "
                     "(a umT5 sentencepiece .model file, a tokenizer directory or a hub id). The shipped 768-piece "
                     "test tokenizer is used only for the tiny preset")
