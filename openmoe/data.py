"""Data for openmoe-train: tokenizer conventions, dataset loading, masking/packing, collation, sharded batches.

Everything here runs on the CPU and knows nothing of process groups: a data-parallel rank arrives as a plain integer
(`ShardedBatches(dp_rank=..., dp_size=...)`) and the training loop does the one `.to(device)`. Imports torch,
datasets and transformers only (no colossalai, no torch.distributed).

Conventions (umT5 tokenizer, as used by the published OpenMoE checkpoints):
    ids        <pad> = 0 is also BOS (OpenMoE was trained with "<pad>" prepended), </s> = 1 is EOS, <unk> = 2;
               the tokenizer has no BOS of its own. `encode` is the only place that applies this, for training and
               inference alike.
    example    [BOS] + prompt + completion + [EOS], cut to max_length (a cut example keeps no EOS). Upstream's
               fine-tuning script appended no EOS; without one a fine-tuned model never learns to stop.
    labels     equal input_ids; the model shifts (logits at t predict labels at t+1, HF convention). IGNORE_INDEX
               (-100) on every BOS (nothing should learn to predict it), on padding, and on the prompt if mask_prompt.
Shapes (collate / ShardedBatches):
    B batch per dp rank, S sequence (longest row, or max_length, rounded up to pad_to_multiple_of), G = B * dp_size
    input_ids [B, S] long; attention_mask [B, S] long (1 real, 0 pad; right padding); labels [B, S] long

Public API:
    load_tokenizer(path)                           sentencepiece .model file or tokenizer directory -> tokenizer
    encode(tokenizer, text, add_bos, add_eos)      text -> ids with OpenMoE's <pad>-as-BOS convention
    decode(tokenizer, ids)                         ids -> text without BOS/EOS/pad
    check_vocab(tokenizer, model_vocab_size)       ValueError if token ids could index past the embedding
    load_records(dataset, dataset_config, split, data_files, cache_dir)   hub id or local json/jsonl/parquet -> Dataset
    check_fields(records, fields)                  ValueError naming the missing and the found fields
    tokenize_examples(records, tokenizer, max_length, ...)   records -> [{"input_ids": [...], "labels": [...]}]
    pack_examples(examples, max_length)            concatenate examples into max_length blocks
    collate(examples, pad_id, max_length, pad_to_multiple_of)  examples -> dict of [B, S] CPU tensors
    ShardedBatches(examples, batch_size, dp_rank, dp_size, seed, drop_last, ...)
                                                   seeded, resumable, dp-sharded batches; state_dict/load_state_dict
"""

import json
import math
import re
from pathlib import Path

import datasets
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5Tokenizer

IGNORE_INDEX = -100  # label value F.cross_entropy(ignore_index=-100) skips

_SENTENCEPIECE_FILES = ("spiece.model", "tokenizer.model")
_BUILDER_BY_SUFFIX = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local path (nothing is fetched from the Hub).

    path: a sentencepiece `.model` file, or a directory holding
      - a saved HF tokenizer (tokenizer_config.json): AutoTokenizer, the slow sentencepiece-backed class when the
        directory has spiece.model / tokenizer.model (the fast conversion drops umT5's byte fallback), else fast;
      - only spiece.model or tokenizer.model: T5Tokenizer with extra_ids=0 (no <extra_id_*> sentinels are appended,
        so len(tokenizer) is the sentencepiece vocabulary).
    The tokenizer must define pad and eos tokens (OpenMoE's BOS and EOS).
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
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer at {path} has pad_token_id={tokenizer.pad_token_id}, eos_token_id={tokenizer.eos_token_id}; "
            "OpenMoE needs both (<pad> is its BOS): use a umT5-style tokenizer (pad=0, eos=1)"
        )
    return tokenizer


def encode(tokenizer, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
    """Token ids of `text` with OpenMoE's conventions: [pad_id (as BOS)] + ids (+ [eos_id]).

    The one place the <pad>-as-BOS convention lives; training (tokenize_examples) and inference both call it.
    add_special_tokens=False because T5Tokenizer would otherwise append </s> itself; EOS is added here, explicitly.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ([tokenizer.pad_token_id] if add_bos else []) + ids + ([tokenizer.eos_token_id] if add_eos else [])


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
# Records


def load_records(dataset: str, dataset_config: str | None = None, split: str = "train", data_files=None,
                 cache_dir: str | None = None) -> datasets.Dataset:
    """Load one split of a dataset as a `datasets.Dataset`, via `datasets.load_dataset`.

    dataset: a local .json / .jsonl / .parquet file or a directory of them (builder chosen by extension; the
        files form the requested split, so `split` only names it, slices like "train[:100]" work), or a Hub id such
        as "yizhongw/self_instruct" with dataset_config "super_natural_instructions" (the upstream default).
    data_files: passed to load_dataset for Hub datasets only.
    cache_dir: where datasets writes its Arrow cache (default ~/.cache/huggingface/datasets).
    A local-looking path that does not exist raises FileNotFoundError; malformed JSON raises ValueError with the
    file and line.
    """
    path = Path(dataset).expanduser()
    if path.exists():
        if data_files is not None:
            raise ValueError(f"data_files applies to Hub datasets; {dataset} is local: pass the file itself as dataset")
        files, builder = _local_files(path)
        split_name = split.split("[")[0]  # "train[:100]" -> "train"
        try:
            return datasets.load_dataset(builder, data_files={split_name: [str(f) for f in files]}, split=split,
                                         cache_dir=cache_dir)
        except datasets.exceptions.DatasetGenerationError:
            if builder == "json":
                for f in files:
                    _raise_on_bad_json(f)
            raise
    if not _HUB_ID.match(dataset) or path.suffix in _BUILDER_BY_SUFFIX:
        raise FileNotFoundError(f"dataset file {path} does not exist (and {dataset!r} is not a Hub dataset id)")
    return datasets.load_dataset(dataset, dataset_config, split=split, data_files=data_files, cache_dir=cache_dir)


def _local_files(path: Path) -> tuple[list[Path], str]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in _BUILDER_BY_SUFFIX)
        if not files:
            raise FileNotFoundError(f"no {' / '.join(_BUILDER_BY_SUFFIX)} files under directory {path}")
    builders = {_BUILDER_BY_SUFFIX.get(f.suffix) for f in files}
    if None in builders:
        raise ValueError(f"unsupported dataset file {path}; expected one of {', '.join(_BUILDER_BY_SUFFIX)}")
    if len(builders) > 1:
        raise ValueError(f"{path} mixes json and parquet files; keep one format per dataset")
    return files, builders.pop()


def _raise_on_bad_json(path: Path) -> None:
    """ValueError naming file:line of the first JSON syntax error (JSON lines, or one JSON document in a .json)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: invalid JSON ({err.msg}, column {err.colno})") from None
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: invalid JSON line ({err.msg}, column {err.colno})") from None


def check_fields(records, fields) -> None:
    """ValueError (one line) if `records` (a Dataset or a list of dicts) lacks any of `fields`."""
    if hasattr(records, "column_names"):
        found = list(records.column_names)
    else:
        found = list(records[0]) if len(records) else []
    missing = [f for f in fields if f not in found]
    if missing:
        raise ValueError(f"dataset is missing field(s) {missing}; fields found: {found} "
                         "(set the prompt/completion or text field names to existing columns)")


# ---------------------------------------------------------------------------------------------------------------------
# Examples: {"input_ids": list[int], "labels": list[int]}, same length, no padding.


def tokenize_examples(records, tokenizer, max_length: int, *, prompt_field: str = "prompt",
                      completion_field: str = "completion", text_field: str | None = None,
                      mask_prompt: bool = False) -> list[dict]:
    """Records -> examples [BOS] + prompt + completion + [EOS] (or [BOS] + text + [EOS] when text_field is set).

    Prompt and completion are tokenized as one string, as upstream OpenMoE fine-tuning did, so the ids do not depend
    on mask_prompt. With mask_prompt the labels of the prompt's tokens are IGNORE_INDEX: the prompt's tokens are the
    longest prefix that the prompt alone tokenizes to (a piece spanning the boundary counts as completion).
    Truncation keeps the first max_length tokens (so a cut example has no EOS). Examples left with no label to train
    on (e.g. a masked prompt that fills max_length) are dropped; ValueError if none remain.
    """
    if max_length < 2:
        raise ValueError(f"max_length ({max_length}) must be >= 2 (BOS plus at least one token)")
    if len(records) == 0:
        raise ValueError("the dataset is empty (0 records)")
    fields = [text_field] if text_field is not None else [prompt_field, completion_field]
    check_fields(records, fields)
    examples = []
    for i, record in enumerate(records):
        texts = [record[f] for f in fields]
        for field, text in zip(fields, texts):
            if not isinstance(text, str):
                raise ValueError(f"record {i}: field {field!r} is {type(text).__name__}, expected str")
        ids = encode(tokenizer, "".join(texts), add_bos=True, add_eos=True)
        num_masked = 1  # BOS
        if mask_prompt and text_field is None:
            num_masked += _common_prefix_len(encode(tokenizer, texts[0], add_bos=False), ids[1:])
        ids = ids[:max_length]
        labels = [IGNORE_INDEX] * min(num_masked, len(ids)) + ids[num_masked:]
        if all(label == IGNORE_INDEX for label in labels):
            continue
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


class ShardedBatches:
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

    def __init__(self, examples: list[dict], batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 drop_last: bool = True, pad_id: int = 0, max_length: int | None = None,
                 pad_to_multiple_of: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size ({batch_size}) must be >= 1")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank ({dp_rank}) must be in [0, dp_size) with dp_size ({dp_size}) >= 1")
        if not examples:
            raise ValueError("the dataset is empty (no examples left after loading and filtering)")
        self.examples = examples
        self.batch_size = batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.drop_last = drop_last
        self.collate_kwargs = dict(pad_id=pad_id, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of)
        self.global_batch_size = batch_size * dp_size
        n = len(examples)
        self.num_batches = n // self.global_batch_size if drop_last else math.ceil(n / self.global_batch_size)
        if self.num_batches == 0:
            raise ValueError(
                f"{n} examples do not fill one global batch of {self.global_batch_size} "
                f"(batch_size {batch_size} x dp_size {dp_size}) with drop_last=True; "
                "use more data, a smaller batch, or drop_last=False"
            )
        self.epoch, self.batch_index = 0, 0  # position of the next batch to yield

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

    def __iter__(self):
        epoch, start = self.epoch, self.batch_index
        while True:
            yield from self.epoch_batches(epoch, start)
            epoch, start = epoch + 1, 0

    def state_dict(self) -> dict:
        """Position of the next batch plus what must match for it to mean the same data on resume."""
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed,
                "num_examples": len(self.examples), "global_batch_size": self.global_batch_size,
                "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Resume at state's position. dp_size may change if the global batch size does not."""
        for key, mine in [("seed", self.seed), ("num_examples", len(self.examples)),
                          ("global_batch_size", self.global_batch_size), ("drop_last", self.drop_last)]:
            if state[key] != mine:
                raise ValueError(f"cannot resume data position: saved {key}={state[key]} but this run has {mine}")
        if not 0 <= state["batch_index"] < self.num_batches:
            raise ValueError(f"saved batch_index ({state['batch_index']}) out of range [0, {self.num_batches})")
        self.epoch, self.batch_index = state["epoch"], state["batch_index"]
