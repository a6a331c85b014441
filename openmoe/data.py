"""Data for openmoe-train: tokenizer conventions, dataset loading, masking/packing, collation, sharded batches.

Everything here runs on the CPU and knows nothing of process groups: a data-parallel rank arrives as a plain integer
(`ShardedBatches(dp_rank=..., dp_size=...)`) and the training loop does the one `.to(device)`. Imports torch,
datasets and transformers only (no colossalai, no torch.distributed).

Conventions (umT5 tokenizer, as used by the published OpenMoE checkpoints):
    ids        <pad> = 0 is also BOS (OpenMoE was trained with "<pad>" prepended), </s> = 1 is EOS, <unk> = 2;
               the tokenizer has no BOS of its own. `encode` is the only place that applies this, for training and
               inference alike.
    example    [BOS] + rendered record (+ [EOS]), cut to max_length (a cut example keeps no EOS); renderings per
               format in openmoe/data_formats.py, e.g. prompt_completion: [BOS] + prompt + completion + [EOS].
               Upstream's fine-tuning script appended no EOS; without one a fine-tuned model never learns to stop.
    labels     equal input_ids; the model shifts (logits at t predict labels at t+1, HF convention). IGNORE_INDEX
               (-100) on every BOS (nothing should learn to predict it), on padding, and on the prompt if mask_prompt
               (prompt: everything but the completion / the assistant turns).
Shapes (collate / ShardedBatches):
    B batch per dp rank, S sequence (longest row, or max_length, rounded up to pad_to_multiple_of), G = B * dp_size
    input_ids [B, S] long; attention_mask [B, S] long (1 real, 0 pad; right padding); labels [B, S] long

Public API:
    DataSpec(source, split, data_format, ..., eval_source, eval_split)   what to train/evaluate on, field per option
    build_examples(spec, tokenizer)                -> Dataset of examples (input_ids, labels), for ShardedBatches
    build_eval_examples(spec, tokenizer)           -> Dataset of eval examples, or None; for eval_batches
    load_tokenizer(path)                           sentencepiece .model file or tokenizer directory -> tokenizer
    encode(tokenizer, text, add_bos, add_eos)      text -> ids with OpenMoE's <pad>-as-BOS convention
    decode(tokenizer, ids)                         ids -> text without BOS/EOS/pad
    check_vocab(tokenizer, model_vocab_size)       ValueError if token ids could index past the embedding
    load_records(dataset, dataset_config, split, data_files, cache_dir, streaming)   see openmoe/data_sources.py
    check_fields(records, fields)                  ValueError naming the missing and the found fields
    encode_segments(tokenizer, segments, ...)      rendered record (openmoe/data_formats.py) -> ids, labels
    tokenize_examples(records, tokenizer, max_length, ...)   prompt/completion or text records -> list of examples
    pack_examples(examples, max_length)            concatenate examples into max_length blocks
    collate(examples, pad_id, max_length, pad_to_multiple_of)  examples -> dict of [B, S] CPU tensors
    ShardedBatches(examples, batch_size, dp_rank, dp_size, seed, drop_last, ...)
                                                   seeded, resumable, dp-sharded batches; state_dict/load_state_dict
    StreamingBatches(examples, batch_size, dp_rank, dp_size, seed, shuffle_buffer, ...)
                                                   the same for a streaming corpus (no len); state_dict/load_state_dict
    eval_batches(examples, batch_size, dp_rank, dp_size, ...)   every eval example once, equal shapes on all ranks
"""

import dataclasses
import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5Tokenizer

from openmoe.data_formats import (
    CHAT_FORMATS,
    CHAT_SYSTEM,
    FORMATS,
    RecordError,
    detect_format,
    format_fields,
    record_segments,
)
from openmoe.data_sources import load_records, source_splits, split_name  # noqa: F401 (load_records: public API)

IGNORE_INDEX = -100  # label value F.cross_entropy(ignore_index=-100) skips

_SENTENCEPIECE_FILES = ("spiece.model", "tokenizer.model")

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local path (nothing is fetched from the Hub).

    path: a sentencepiece `.model` file, or a directory holding
      - a saved HF tokenizer (tokenizer_config.json): AutoTokenizer, the slow sentencepiece-backed class when the
        directory has spiece.model / tokenizer.model (the fast conversion drops umT5's byte fallback), else fast;
      - only spiece.model or tokenizer.model: T5Tokenizer with extra_ids=0 (no <extra_id_*> sentinels are appended,
        so len(tokenizer) is the sentencepiece vocabulary).
    The tokenizer must define eos and a sequence start: OpenMoE's umT5 tokenizer has no BOS and starts with <pad>;
    a LLaMA-family tokenizer (an upcycled model's) starts with its own BOS and often has no pad token: then eos pads
    (only ever under attention mask 0 and label IGNORE_INDEX).
    """
    path = Path(path).expanduser()
    looked_for = ("a sentencepiece .model file, or a directory with "
                  f"{' / '.join(_SENTENCEPIECE_FILES)} or tokenizer_config.json")
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path {path} does not exist; expected {looked_for}")
    if path.is_file():
        if path.suffix != ".model":
            raise ValueError(f"tokenizer file {path} is not a sentencepiece .model file; expected {looked_for}")
        tokenizer = T5Tokenizer(vocab_file=str(path), extra_ids=0, legacy=False)
    else:
        sp_files = [path / name for name in _SENTENCEPIECE_FILES if (path / name).is_file()]
        if (path / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(str(path), use_fast=not sp_files)
        elif sp_files:
            tokenizer = T5Tokenizer(vocab_file=str(sp_files[0]), extra_ids=0, legacy=False)
        else:
            raise FileNotFoundError(f"no tokenizer in directory {path}; expected {looked_for}")
    if tokenizer.eos_token_id is None or (tokenizer.pad_token_id is None and tokenizer.bos_token_id is None):
        raise ValueError(
            f"tokenizer at {path} has eos_token_id={tokenizer.eos_token_id}, pad_token_id={tokenizer.pad_token_id}, "
            f"bos_token_id={tokenizer.bos_token_id}; accepted: an eos token and a sequence start (umT5's <pad>, or a "
            "bos token as LLaMA's)"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode(tokenizer, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
    """Token ids of `text` with OpenMoE's conventions: [start] + ids (+ [eos_id]), where start is the tokenizer's
    BOS when it has one (LLaMA-family tokenizers; our exported OpenMoE tokenizer names <pad> as its BOS) and <pad>
    otherwise (umT5's sentencepiece tokenizer, which has no BOS: OpenMoE was trained with <pad> in that place).

    The one place this convention lives; training (tokenize_examples) and inference both call it.
    add_special_tokens=False because T5Tokenizer would otherwise append </s> itself; EOS is added here, explicitly.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
    return ([start] if add_bos else []) + ids + ([tokenizer.eos_token_id] if add_eos else [])


def decode(tokenizer, ids) -> str:
    """Text of `ids` (list or 1-D tensor) without special tokens (BOS/pad, EOS)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return tokenizer.decode(ids, skip_special_tokens=True)


def check_vocab(tokenizer, model_vocab_size: int) -> None:
    """ValueError if the tokenizer can emit ids >= model_vocab_size (they would index past the embedding table).

    A model vocabulary larger than the tokenizer's is fine (padded vocabularies are common).
    """
    n = len(tokenizer)
    if n > model_vocab_size:
        raise ValueError(
            f"tokenizer has {n} tokens but the model's vocab_size is {model_vocab_size}; "
            f"use a model config with vocab_size >= {n} or a tokenizer with at most {model_vocab_size} tokens"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Records (sources: openmoe/data_sources.py; formats: openmoe/data_formats.py)


def check_fields(records, fields) -> None:
    """ValueError (one line) if `records` (a Dataset or a list of dicts) lacks any of `fields`."""
    found = _columns(records)
    missing = [f for f in fields if f not in found]
    if missing:
        raise ValueError(f"dataset is missing field(s) {missing}; fields found: {found} "
                         "(set the prompt/completion or text field names to existing columns)")


def _columns(records) -> list[str]:
    if getattr(records, "column_names", None) is not None:
        return list(records.column_names)
    if isinstance(records, list):
        return list(records[0]) if records else []
    return list(next(iter(records), {}))  # a streaming dataset whose files do not declare their columns


@dataclass
class DataSpec:
    """What to train (and evaluate) on, and how records become examples. Passed to build_examples /
    build_eval_examples; every field has a working default ("off" value in brackets where it has one)."""

    source: str = "data/sample/train.jsonl"  # local file or directory, save_to_disk directory, or Hub id
    task_name: str | None = None  # Hub config (subset) name, e.g. super_natural_instructions [None: default config]
    split: str = "train"  # split to train on; may carry a slice, "train[:1000]"
    data_format: str = "auto"  # auto | chat | sharegpt | alpaca | prompt_completion | text [auto: from the fields]
    prompt_field: str = "prompt"  # prompt_completion: field holding the prompt
    completion_field: str = "completion"  # prompt_completion: field holding the completion
    text_field: str = "text"  # text: field holding the raw text
    system_prompt: str | None = None  # chat formats: system prompt when a record has none [None: OpenMoE-8B-Chat's,
    #                                   or the default of the tokenizer's own chat_template]
    mask_prompt: bool | None = None  # no loss on prompt/user/system tokens [None: format default, True for
    #                                  chat/sharegpt/alpaca, False for prompt_completion; text has no prompt]
    max_length: int = 64  # tokens per example: longer ones are cut (raw text that is packed is cut into blocks)
    pack: bool | None = None  # concatenate examples into max_length blocks [None: pack raw text only]
    streaming: bool = False  # read records as they are consumed (corpora larger than RAM or disk cache) [False]
    num_proc: int | None = None  # processes tokenizing with datasets.map [None: this process]
    cache_dir: str | None = None  # datasets' Arrow cache [None: ~/.cache/huggingface/datasets]
    eval_source: str | None = None  # evaluation data [None: `source` when eval_split is set, else no evaluation]
    eval_split: str | None = None  # split of the evaluation data [None: "train" of eval_source; no eval without it]
    eval_samples: int | None = None  # evaluate on the first N records [None: all; the first 10,000 when streaming]

    def validate(self) -> None:
        if self.data_format not in FORMATS:
            raise ValueError(f"data_format '{self.data_format}' is not supported; accepted: {list(FORMATS)}")
        if self.max_length < 2:
            raise ValueError(f"max_length ({self.max_length}) must be >= 2 (BOS plus at least one token)")
        if self.num_proc is not None and self.num_proc < 1:
            raise ValueError(f"num_proc ({self.num_proc}) must be >= 1, or None to tokenize in this process")
        if self.num_proc is not None and self.streaming:
            raise ValueError(f"num_proc ({self.num_proc}) applies to prepared datasets; a streaming dataset is "
                             "tokenized as it is read: drop num_proc or streaming")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise ValueError(f"eval_samples ({self.eval_samples}) must be >= 1, or None for the whole eval split")


def build_examples(spec: DataSpec, tokenizer):
    """The training examples of `spec`: a datasets.Dataset with columns input_ids and labels (what ShardedBatches
    and collate consume), tokenized once with datasets.map (cached in cache_dir: a later run, or another rank after
    this one, reads the cache instead of tokenizing again); an IterableDataset of the same rows when streaming."""
    spec.validate()
    records = load_records(spec.source, spec.task_name, spec.split, cache_dir=spec.cache_dir,
                           streaming=spec.streaming)
    return _build(records, spec, tokenizer, f"{spec.source} (split '{spec.split}')")


def build_eval_examples(spec: DataSpec, tokenizer) -> datasets.Dataset | None:
    """The evaluation examples of `spec` (a Dataset, first eval_samples records), or None when spec asks for no
    evaluation. Rendered, masked and packed as the training examples are. Refuses to evaluate on the training split."""
    spec.validate()
    if spec.eval_source is None and spec.eval_split is None:
        return None
    source, split = spec.eval_source or spec.source, spec.eval_split or "train"
    if source == spec.source:
        if split_name(split) == split_name(spec.split):
            raise ValueError(f"eval_split '{split}' is the training split of {source}; choose another split or "
                             "another evaluation dataset (eval_source; --eval_dataset on the command line)")
        if Path(source).expanduser().exists() and source_splits(source, spec.task_name, spec.cache_dir) is None:
            raise ValueError(f"{source} holds a single split, so eval_split '{split}' would evaluate on the "
                             "training data; pass a separate file as eval_source (--eval_dataset on the command line) "
                             "or a directory with split files")
    records = load_records(source, spec.task_name, split, cache_dir=spec.cache_dir, streaming=spec.streaming)
    if spec.streaming:  # an eval set is small: materialise its first records
        records = datasets.Dataset.from_list(list(records.take(spec.eval_samples or _EVAL_STREAM_LIMIT)))
    elif spec.eval_samples is not None:
        records = records.select(range(min(spec.eval_samples, len(records))))
    return _build(records, dataclasses.replace(spec, streaming=False), tokenizer, f"{source} (split '{split}')")


_EVAL_STREAM_LIMIT = 10_000  # records taken from a streamed eval split without eval_samples
_PACK_DOCS = 1000  # documents packed together per datasets.map batch (each batch's last block may be short)


def resolve_format(spec: DataSpec, fields: list[str], where: str = "dataset") -> str:
    """spec.data_format, or the format detected from the dataset's fields when "auto"; ValueError naming the fields
    found when they do not fit."""
    names = dict(prompt_field=spec.prompt_field, completion_field=spec.completion_field, text_field=spec.text_field)
    if spec.data_format == "auto":
        detected = detect_format(fields, **names)
        if detected is None:
            accepted = "; ".join(f"{f}: {format_fields(f, **names)}" for f in FORMATS[1:])
            raise ValueError(f"cannot tell the data format of {where} from the fields found {fields}; accepted: "
                             f"{accepted} (or set data_format and the field names)")
        return detected
    return spec.data_format


def _build(records, spec: DataSpec, tokenizer, where: str):
    fields = _columns(records)
    data_format = resolve_format(spec, fields, where)
    mask_prompt = spec.mask_prompt if spec.mask_prompt is not None else data_format in CHAT_FORMATS
    pack = spec.pack if spec.pack is not None else data_format == "text"
    # Raw text that is packed is cut into blocks by packing, never truncated (a long document keeps its tail).
    max_length = None if pack and data_format == "text" else spec.max_length
    render = dict(data_format=data_format, prompt_field=spec.prompt_field, completion_field=spec.completion_field,
                  text_field=spec.text_field, system=spec.system_prompt)
    kwargs = dict(batched=True, with_indices=True, remove_columns=fields,
                  fn_kwargs=dict(tokenizer=tokenizer, render=render, mask_prompt=mask_prompt,
                                 max_length=max_length, where=where))
    if not spec.streaming:
        kwargs.update(num_proc=spec.num_proc, desc=f"tokenizing {data_format}")
    examples = records.map(_tokenize_batch, **kwargs)
    if pack:
        examples = examples.map(_pack_batch, batched=True, batch_size=_PACK_DOCS,
                                fn_kwargs=dict(max_length=spec.max_length))
    if spec.streaming:
        return examples
    if not pack and len(examples) < len(records):
        logger.warning(f"{len(records) - len(examples)} of {len(records)} records of {where} have no token to train "
                       f"on within max_length={spec.max_length} (mask_prompt={mask_prompt}) and were dropped")
    if len(examples) == 0:
        system = ""
        if data_format in CHAT_FORMATS:  # every prompt starts with the system prompt (unless a record has its own)
            n = len(tokenizer(CHAT_SYSTEM if spec.system_prompt is None else spec.system_prompt,
                              add_special_tokens=False)["input_ids"])
            system = (f"; each prompt starts with the {'default ' if spec.system_prompt is None else ''}system prompt "
                      f"({n} tokens): shorten it with --system_prompt")
        raise ValueError(f"no examples left after tokenization of {where}: all {len(records)} records have no token "
                         f"to train on within max_length={spec.max_length} (mask_prompt={mask_prompt}){system}; "
                         "raise max_length or check the dataset")
    return examples


def _tokenize_batch(batch: dict, indices: list[int], *, tokenizer, render: dict, mask_prompt: bool,
                    max_length: int | None, where: str) -> dict:
    out = {"input_ids": [], "labels": []}
    for row, index in enumerate(indices):
        record = {k: v[row] for k, v in batch.items()}
        try:
            segments = record_segments(record, **render, tokenizer=tokenizer)  # tokenizer: its chat_template
        except RecordError as err:
            found = [k for k, v in record.items() if v is not None]
            raise ValueError(f"record {index} of {where} does not fit the {render['data_format']} format: {err}; "
                             f"needs {format_fields(render['data_format'], **_field_names(render))}; fields found: "
                             f"{found}") from None
        # chat templates close each assistant turn with EOS themselves
        add_eos = render["data_format"] in ("prompt_completion", "text")
        ids, labels = encode_segments(tokenizer, segments, add_eos=add_eos, mask_prompt=mask_prompt)
        if max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        if any(label != IGNORE_INDEX for label in labels):  # an example with nothing to learn is dropped
            out["input_ids"].append(ids)
            out["labels"].append(labels)
    return out


def _field_names(render: dict) -> dict:
    return {k: render[k] for k in ("prompt_field", "completion_field", "text_field")}


def _pack_batch(batch: dict, max_length: int) -> dict:
    packed = pack_examples([{"input_ids": i, "labels": l} for i, l in zip(batch["input_ids"], batch["labels"])],
                           max_length)
    return {"input_ids": [ex["input_ids"] for ex in packed], "labels": [ex["labels"] for ex in packed]}


# ---------------------------------------------------------------------------------------------------------------------
# Examples: {"input_ids": list[int], "labels": list[int]}, same length, no padding.


def encode_segments(tokenizer, segments: list[tuple[str, bool]], add_eos: bool, mask_prompt: bool
                    ) -> tuple[list[int], list[int]]:
    """ids = encode(joined text) with BOS (and EOS); labels = ids with IGNORE_INDEX on BOS and, if mask_prompt, on
    the tokens of every segment that is not a response.

    The text is tokenized once, as a whole, so the ids are what inference feeds for the same text. A segment's
    tokens end where the text up to its end, tokenized alone, stops agreeing with the whole (a piece spanning a
    boundary belongs to the later segment).
    """
    text = "".join(t for t, _ in segments)
    ids = encode(tokenizer, text, add_bos=True, add_eos=add_eos)
    body = ids[1:]
    labels = [IGNORE_INDEX]  # BOS: nothing should learn to predict it
    if not mask_prompt:
        return ids, labels + body
    start, chars = 0, 0
    for i, (segment, is_response) in enumerate(segments):
        chars += len(segment)
        end = len(body) if i == len(segments) - 1 else max(
            start, _common_prefix_len(encode(tokenizer, text[:chars], add_bos=False), body))
        labels += body[start:end] if is_response else [IGNORE_INDEX] * (end - start)
        start = end
    return ids, labels


def tokenize_examples(records, tokenizer, max_length: int, *, prompt_field: str = "prompt",
                      completion_field: str = "completion", text_field: str | None = None,
                      mask_prompt: bool = False) -> list[dict]:
    """Records -> examples [BOS] + prompt + completion + [EOS] (or [BOS] + text + [EOS] when text_field is set).

    The list-in, list-out form of build_examples for prompt_completion and text records (no datasets.map): prompt
    and completion are tokenized as one string (encode_segments), as upstream OpenMoE fine-tuning did, so the ids
    do not depend on mask_prompt. Truncation keeps the first max_length tokens (so a cut example has no EOS).
    Examples left with no label to train on (e.g. a masked prompt that fills max_length) are dropped; ValueError if
    none remain.
    """
    if max_length < 2:
        raise ValueError(f"max_length ({max_length}) must be >= 2 (BOS plus at least one token)")
    if len(records) == 0:
        raise ValueError("the dataset is empty (0 records)")
    fields = [text_field] if text_field is not None else [prompt_field, completion_field]
    check_fields(records, fields)
    data_format = "text" if text_field is not None else "prompt_completion"
    render = dict(data_format=data_format, prompt_field=prompt_field, completion_field=completion_field,
                  text_field=text_field or "text")
    examples = []
    for i, record in enumerate(records):
        try:
            segments = record_segments(record, **render)
        except RecordError as err:
            raise ValueError(f"record {i}: {err}") from None
        ids, labels = encode_segments(tokenizer, segments, add_eos=True, mask_prompt=mask_prompt)
        ids, labels = ids[:max_length], labels[:max_length]
        if any(label != IGNORE_INDEX for label in labels):
            examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise ValueError(
            f"no examples left after tokenization: all {len(records)} records have no token to train on within "
            f"max_length={max_length} (mask_prompt={mask_prompt}); raise max_length or check the dataset"
        )
    return examples


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Concatenate examples (in order) and cut the stream into blocks of max_length tokens; the last may be shorter.

    Every token and label is kept, in order. Attention stays plain causal across a block, so a document can attend
    to the documents before it in the same block (as in most packers without variable-length attention); each
    document still starts with BOS, whose label is IGNORE_INDEX, so nothing learns to predict across the seam. A
    document cut at a block edge continues in the next block without BOS, and the first token of each block is never
    a target (nothing precedes it).
    """
    if max_length < 1:
        raise ValueError(f"max_length ({max_length}) must be >= 1")
    ids = [t for ex in examples for t in ex["input_ids"]]
    labels = [t for ex in examples for t in ex["labels"]]
    return [{"input_ids": ids[i:i + max_length], "labels": labels[i:i + max_length]}
            for i in range(0, len(ids), max_length)]


# ---------------------------------------------------------------------------------------------------------------------
# Batches


def collate(examples: list[dict], pad_id: int = 0, max_length: int | None = None,
            pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad examples into CPU tensors input_ids / attention_mask / labels, each [B, S] long.

    S is the longest example, or exactly max_length when given (fixed shapes, e.g. for pipeline stages or
    torch.compile; a longer example is a ValueError), then rounded up to a multiple of pad_to_multiple_of.
    Padding: input_ids pad_id, attention_mask 0, labels IGNORE_INDEX.
    """
    if not examples:
        raise ValueError("collate got an empty list of examples")
    longest = max(len(ex["input_ids"]) for ex in examples)
    if max_length is not None and longest > max_length:
        raise ValueError(f"an example has {longest} tokens, more than max_length ({max_length})")
    seq_len = max_length if max_length is not None else longest
    if pad_to_multiple_of:
        seq_len = math.ceil(seq_len / pad_to_multiple_of) * pad_to_multiple_of
    batch = len(examples)
    input_ids = torch.full((batch, seq_len), pad_id, dtype=torch.long)  # [B, S]
    attention_mask = torch.zeros((batch, seq_len), dtype=torch.long)  # [B, S]
    labels = torch.full((batch, seq_len), IGNORE_INDEX, dtype=torch.long)  # [B, S]
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(ex["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def check_rank_args(batch_size: int, dp_rank: int, dp_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size ({batch_size}) must be >= 1")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank ({dp_rank}) must be in [0, dp_size) with dp_size ({dp_size}) >= 1")


class _RankBatches:
    """What ShardedBatches and StreamingBatches share: this rank's rows [r*batch_size, (r+1)*batch_size) of each
    global batch of G = batch_size * dp_size examples, a position (epoch, next batch) that advances as batches are
    yielded, endless iteration from that position, and a resumable state checked against the fields that must match
    for the position to mean the same data (`_resume_keys`, each an attribute of the object)."""

    _resume_keys: tuple[str, ...] = ("seed", "global_batch_size")

    def __init__(self, examples, batch_size: int, dp_rank: int, dp_size: int, seed: int, pad_id: int,
                 max_length: int | None, pad_to_multiple_of: int | None):
        check_rank_args(batch_size, dp_rank, dp_size)
        self.examples = examples
        self.batch_size = batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.collate_kwargs = dict(pad_id=pad_id, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of)
        self.global_batch_size = batch_size * dp_size
        self.epoch, self.batch_index = 0, 0  # position of the next batch to yield

    def epoch_batches(self, epoch: int, start_batch: int = 0):
        raise NotImplementedError

    def __iter__(self):
        epoch, start = self.epoch, self.batch_index
        while True:
            yield from self.epoch_batches(epoch, start)
            epoch, start = epoch + 1, 0

    def state_dict(self) -> dict:
        """Position of the next batch plus what must match for it to mean the same data on resume."""
        return {"epoch": self.epoch, "batch_index": self.batch_index,
                **{key: getattr(self, key) for key in self._resume_keys}}

    def load_state_dict(self, state: dict) -> None:
        """Resume at state's position. dp_size may change if the global batch size does not."""
        for key in self._resume_keys:
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume data position: saved {key}={state[key]} but this run has "
                                 f"{getattr(self, key)}" + (" (--batch_size x data-parallel ranks: keep --batch_size "
                                                            "x ranks as the checkpoint had it)"
                                                            if key == "global_batch_size" else ""))
        self._check_position(state["batch_index"])
        self.epoch, self.batch_index = state["epoch"], state["batch_index"]

    def _check_position(self, batch_index: int) -> None:
        pass


class ShardedBatches(_RankBatches):
    """Deterministic, resumable batches for one data-parallel rank.

    Epoch e visits the examples in `torch.randperm(N)` order from a generator seeded with seed + e (the same on every
    rank, as torch's DistributedSampler does). Global batch b is order[b*G : (b+1)*G] with G = batch_size * dp_size,
    and rank r takes rows [r*batch_size, (r+1)*batch_size) of it: so the ranks' slices are disjoint and concatenating
    them in rank order gives exactly the batch a single process with batch_size * dp_size gets (row for row; the
    tensors match too when padded to a fixed max_length).

    drop_last=True drops the last partial global batch; drop_last=False fills it by wrapping around the epoch's order
    (every rank must run the same number of steps). len() = batches per epoch for this rank.

    The position (epoch, next batch) advances as each batch is yielded; `state_dict()` after a step therefore points
    at the next unseen batch, and `load_state_dict` + iterating resumes there. Iterating the object runs from the
    current position through all later epochs, without end: bound it by steps, e.g. zip(range(steps), batches).
    """

    _resume_keys = ("seed", "num_examples", "global_batch_size", "drop_last")

    def __init__(self, examples: list[dict], batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 drop_last: bool = True, pad_id: int = 0, max_length: int | None = None,
                 pad_to_multiple_of: int | None = None):
        super().__init__(examples, batch_size, dp_rank, dp_size, seed, pad_id, max_length, pad_to_multiple_of)
        if not examples:
            raise ValueError("the dataset is empty (no examples left after loading and filtering)")
        self.drop_last = drop_last
        n = len(examples)
        self.num_batches = n // self.global_batch_size if drop_last else math.ceil(n / self.global_batch_size)
        if self.num_batches == 0:
            raise ValueError(
                f"{n} examples do not fill one global batch of {self.global_batch_size} "
                f"(batch_size {batch_size} x dp_size {dp_size}) with drop_last=True; "
                "use more data, a smaller batch, or drop_last=False"
            )

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    def __len__(self) -> int:
        return self.num_batches

    def epoch_order(self, epoch: int) -> list[int]:
        """Example indices of the epoch's global batches, concatenated (length num_batches * G)."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.examples), generator=generator).tolist()
        total = self.num_batches * self.global_batch_size
        while len(order) < total:  # drop_last=False: wrap around to fill the last global batch
            order += order[:total - len(order)]
        return order[:total]

    def epoch_batches(self, epoch: int, start_batch: int = 0):
        """Yield this rank's collated batches of `epoch`, starting at batch index start_batch."""
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch ({start_batch}) must be in [0, {self.num_batches}]")
        order = self.epoch_order(epoch)
        for b in range(start_batch, self.num_batches):
            start = b * self.global_batch_size + self.dp_rank * self.batch_size
            rows = [self.examples[i] for i in order[start:start + self.batch_size]]
            self.epoch, self.batch_index = (epoch, b + 1) if b + 1 < self.num_batches else (epoch + 1, 0)
            yield collate(rows, **self.collate_kwargs)

    def _check_position(self, batch_index: int) -> None:
        if not 0 <= batch_index < self.num_batches:
            raise ValueError(f"saved batch_index ({batch_index}) out of range [0, {self.num_batches})")


def eval_batches(examples, batch_size: int, dp_rank: int = 0, dp_size: int = 1, pad_id: int = 0,
                 max_length: int | None = None):
    """Yield this rank's batches covering every example exactly once, in order: global batch b is examples
    [b*G, (b+1)*G) with G = batch_size * dp_size, and rank r takes rows [r*batch_size, (r+1)*batch_size) of it.

    The last global batch is filled with copies of example 0 whose labels are all IGNORE_INDEX, so every rank runs
    the same number of steps on the same shapes (equal capacity and all-to-all splits under EP) and the fillers add
    nothing to a loss summed over target tokens. Sum the per-token CE and the target-token count over batches and
    ranks, then divide once: that is the eval loss (exp of it the perplexity), independent of dp_size.
    """
    check_rank_args(batch_size, dp_rank, dp_size)
    n = len(examples)
    if n == 0:
        raise ValueError("the eval dataset is empty (no examples left after loading and filtering)")
    filler = dict(examples[0])
    filler["labels"] = [IGNORE_INDEX] * len(filler["input_ids"])
    global_batch = batch_size * dp_size
    for start in range(0, n, global_batch):
        first = start + dp_rank * batch_size
        rows = [examples[i] if i < n else filler for i in range(first, first + batch_size)]
        yield collate(rows, pad_id=pad_id, max_length=max_length)


class StreamingBatches(_RankBatches):
    """ShardedBatches for a streaming corpus (an IterableDataset from build_examples with streaming=True): the same
    batches per rank, read in order instead of by index, for data larger than RAM or the disk cache.

    Every rank reads the same stream (optionally through a seeded shuffle buffer, reseeded per epoch) and keeps its
    rows [r*batch_size, (r+1)*batch_size) of each global batch of G = batch_size * dp_size examples: the ranks'
    slices are disjoint and their concatenation is the batch a single process with batch_size * dp_size gets. Each
    rank therefore reads (and tokenizes) the whole stream, which costs CPU and input bandwidth, not accelerator time.
    An epoch's last partial global batch is dropped, so all ranks run the same steps. The stream's length is not
    known in advance: there is no len(); bound training by steps.

    state_dict() is the position (epoch, next batch); load_state_dict + iterating resumes exactly there by reading
    the epoch again up to that batch (exact with or without the shuffle buffer; the cost grows with the position).
    """

    _resume_keys = ("seed", "global_batch_size", "shuffle_buffer")

    def __init__(self, examples, batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 0, pad_id: int = 0, max_length: int | None = None,
                 pad_to_multiple_of: int | None = None):
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer ({shuffle_buffer}) must be >= 0 (0: stream order)")
        super().__init__(examples, batch_size, dp_rank, dp_size, seed, pad_id, max_length, pad_to_multiple_of)
        self.shuffle_buffer = shuffle_buffer

    def epoch_stream(self, epoch: int):
        """The epoch's examples in order (shuffled through the buffer with seed + epoch when shuffle_buffer > 0)."""
        if not self.shuffle_buffer:
            return iter(self.examples)
        return iter(self.examples.shuffle(seed=self.seed + epoch, buffer_size=self.shuffle_buffer))

    def epoch_batches(self, epoch: int, start_batch: int = 0):
        """Yield this rank's collated batches of `epoch`, starting at batch index start_batch."""
        G, first = self.global_batch_size, self.dp_rank * self.batch_size
        stream = itertools.islice(self.epoch_stream(epoch), start_batch * G, None)  # resume: read up to the position
        rows, b = [], start_batch
        for i, example in enumerate(stream):
            if first <= i % G < first + self.batch_size:
                rows.append(example)
            if i % G == G - 1:
                self.epoch, self.batch_index = epoch, b + 1
                yield collate(rows, **self.collate_kwargs)
                rows, b = [], b + 1
        if b == 0:
            raise ValueError(f"the stream does not fill one global batch of {G} examples "
                             f"(batch_size {self.batch_size} x dp_size {G // self.batch_size}) in epoch {epoch}")
        self.epoch, self.batch_index = epoch + 1, 0
