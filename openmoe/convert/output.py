"""What every converter does with its --output directory.

  * An existing, non-empty --output is refused (one line naming it, before anything expensive is read) unless
    --overwrite is given; then the old directory is replaced only once the new one is complete (io/hf's atomic
    directory). The trainer's own `OUT/hf` export replaces itself through io/hf directly and is not checked here.
  * The export carries a tokenizer: --tokenizer if given, else the source directory's own files, written with
    openmoe.tokenizer.save_tokenizer as the trainer's export is, so AutoTokenizer, pipeline() and
    `train.py --pretrained` find it. A source without one gets a note saying how to add one.
"""

from __future__ import annotations

import os

from openmoe.config import OpenMoeConfig
from openmoe.hub import TOKENIZER_FILES
from openmoe.io.hf import path_within


def add_output_arguments(p, what: str) -> None:
    """--output, --overwrite and --tokenizer of a converter subcommand; `what` describes the output format."""
    p.add_argument("--output", required=True, help=f"{what} output directory (written atomically; an existing "
                                                   "non-empty directory needs --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty --output (the old one stays until the new one is complete)")


def add_tokenizer_argument(p, source_flag: str) -> None:
    p.add_argument("--tokenizer", default=None,
                   help=f"tokenizer written into the export (a tokenizer directory, a sentencepiece .model file for "
                        f"the openmoe family, or a hub id); default: the {source_flag} directory's own, if any")


def check_output(output: str, overwrite: bool, sources: tuple[str | None, ...] = ()) -> None:
    """Refuse an occupied `output` unless `overwrite`; refuse to overwrite a directory that holds one of `sources`
    (the atomic replace would delete an input the user still has nowhere else)."""
    if not os.path.lexists(output) or (os.path.isdir(output) and not os.listdir(output)):
        return
    if not overwrite:
        what = "is not empty" if os.path.isdir(output) else "is not a directory"
        raise ValueError(f"refusing to write into {output}: it exists and {what}; pass --overwrite to replace it")
    held = [s for s in sources if s and os.path.exists(s) and path_within(s, output)]
    if held:
        raise ValueError(f"refusing to overwrite {output}: it holds the input {held[0]}; write to another --output")


def has_tokenizer_files(directory: str | None) -> bool:
    return directory is not None and any(os.path.isfile(os.path.join(directory, f)) for f in TOKENIZER_FILES)


def source_tokenizer(config: OpenMoeConfig, source: str | None, explicit: str | None = None):
    """The tokenizer an export of `config` carries: `explicit` (--tokenizer) if given, else the one in the `source`
    directory, else None. Checked against the model's vocab_size (before any weight is read)."""
    from openmoe.data import check_vocab
    from openmoe.hub import tokenizer_path

    if not explicit and not has_tokenizer_files(source):
        return None
    path = tokenizer_path(source, None, explicit)
    if config.pad_is_bos:
        # the openmoe family: loaded as train.py loads it (umT5 sentencepiece, <pad> as BOS); save_tokenizer then
        # writes it with those conventions, as the trainer's export does
        from openmoe.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(path)
    else:
        # llama_moe: the LLaMA tokenizer as it is (openmoe's loader demands a pad token, which LLaMA's lack), saved
        # back unchanged by save_tokenizer
        from transformers import AutoTokenizer

        if not os.path.isdir(path):
            raise ValueError(f"--tokenizer {path} is not a directory; accepted for a llama_moe model: a tokenizer "
                             f"directory (one of {', '.join(TOKENIZER_FILES)}) or a hub id")
        tokenizer = AutoTokenizer.from_pretrained(path)
    check_vocab(tokenizer, config.vocab_size)
    return tokenizer


def no_tokenizer_note(output: str, source: str, source_flag: str) -> str:
    return (f"note: {output} has no tokenizer ({source_flag} {source} holds none of {', '.join(TOKENIZER_FILES)}); "
            "AutoTokenizer, pipeline() and train.py --pretrained need one: convert again with --tokenizer PATH "
            "--overwrite")
