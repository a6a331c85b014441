"""Where fine-tuning records come from: one split of a local file, a local directory, a `save_to_disk` directory or a
Hub dataset, as a `datasets.Dataset` (or an `IterableDataset` when streaming). Imports datasets only.

Sources (`load_records(source, ...)`):
  local file       .json / .jsonl / .parquet / .csv / .txt (one record per line, field "text") / .arrow: the file is
                   the whole dataset, so `split` only names it.
  local directory  split-aware by datasets' own rules (`datasets.load_dataset(dir)`): file names containing train /
                   test / validation (also dev, val, eval: test), HF snapshot layouts such as
                   data/train-00000-of-00001.parquet, a README.md `configs:` block; files with no split name form
                   "train". A split the directory does not have is an error naming the ones it has.
  save_to_disk     a directory written by `Dataset.save_to_disk` (one split: `split` only names it) or
                   `DatasetDict.save_to_disk` (split chosen by name).
  Hub id           "owner/name" (+ config name), through `datasets.load_dataset`; offline (HF_HUB_OFFLINE=1) it
                   loads a copy prepared earlier in cache_dir.
`split` may carry a slice ("train[:100]", "train[10%:]"). Local text files are checked once, before datasets first
prepares them (not on later runs, which read the prepared cache, nor when streaming): an empty file, bytes that are
not UTF-8 (pyarrow would otherwise load them and fail later, far from the cause) and malformed JSON each raise one
ValueError naming the file and line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import requests

BUILDER_BY_SUFFIX = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text",
                     ".arrow": "arrow"}
_TEXT_SUFFIXES = (".json", ".jsonl", ".csv", ".txt")
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def load_records(dataset: str, dataset_config: str | None = None, split: str = "train", data_files=None,
                 cache_dir: str | None = None, streaming: bool = False):
    """One split of `dataset` (see the module docstring for the accepted sources) as a Dataset, or an
    IterableDataset when streaming (records read as they are consumed; nothing is prepared on disk first).

    dataset_config: the Hub config (subset) name, e.g. "super_natural_instructions" for "yizhongw/self_instruct", or
        a README `configs:` name of a local directory. data_files: passed to load_dataset for Hub datasets only.
    cache_dir: where datasets writes its Arrow cache (default ~/.cache/huggingface/datasets).
    """
    try:
        return _load_records(dataset, dataset_config, split, data_files, cache_dir, streaming)
    except ValueError as e:
        if "Unrecognized instruction format" not in str(e):
            raise
        raise ValueError(f"split {split!r} of {dataset} is not a split name or slice ({e}); accepted: NAME, "
                         "NAME[:N], NAME[A:B] or NAME[A%:B%], e.g. train[:1000] or train[90%:]") from None


def _load_records(dataset: str, dataset_config, split: str, data_files, cache_dir, streaming: bool):
    path = Path(dataset).expanduser()
    if path.exists():
        if data_files is not None:
            raise ValueError(f"data_files applies to Hub datasets; {dataset} is local: pass the file itself as dataset")
        if path.is_file():
            return _load_file(path, split, cache_dir, streaming)
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _load_saved(path, split, streaming)
        return _load_directory(path, dataset_config, split, cache_dir, streaming)
    if not _HUB_ID.match(dataset) or path.suffix in BUILDER_BY_SUFFIX:
        raise FileNotFoundError(f"dataset file {path} does not exist (and {dataset!r} is not a Hub dataset id)")
    try:
        return datasets.load_dataset(dataset, dataset_config, split=split, data_files=data_files, cache_dir=cache_dir,
                                     streaming=streaming)
    except (ConnectionError, requests.exceptions.ConnectionError) as e:  # no network, and not in the cache
        raise ValueError(f"Hub dataset {dataset!r} is neither a local path nor in the datasets cache, and the Hub "
                         f"could not be reached ({str(e).splitlines()[0]}); download it where there is network, or "
                         "pass a local file or directory") from None


def split_name(split: str) -> str:
    """"train[:100]" -> "train"."""
    return split.split("[")[0]


def source_splits(dataset: str, dataset_config: str | None = None, cache_dir: str | None = None) -> list[str] | None:
    """The split names a local directory or save_to_disk directory holds; None for a single file or a single saved
    Dataset (one split, whatever it is called) and for Hub ids (not resolved here, to stay offline)."""
    path = Path(dataset).expanduser()
    if not path.is_dir():
        return None
    if (path / "dataset_dict.json").is_file():
        return list(json.loads((path / "dataset_dict.json").read_text())["splits"])
    if (path / "state.json").is_file():
        return None
    builder = datasets.load_dataset_builder(str(path), dataset_config, cache_dir=cache_dir)
    return [str(s) for s in builder.config.data_files]


def _load_file(path: Path, split: str, cache_dir, streaming):
    builder_name = BUILDER_BY_SUFFIX.get(path.suffix)
    if builder_name is None:
        raise ValueError(f"unsupported dataset file {path}; expected one of {', '.join(BUILDER_BY_SUFFIX)}")
    data_files = {split_name(split): [str(path)]}
    # CSV cells are text as written (" 1" stays " 1", an empty cell ""), not numbers or NaN guessed by pandas
    options = _csv_as_text(path) if builder_name == "csv" else {}
    builder = datasets.load_dataset_builder(builder_name, data_files=data_files, cache_dir=cache_dir, **options)
    return _load_checked(builder, [path], streaming, lambda: datasets.load_dataset(
        builder_name, data_files=data_files, split=split, cache_dir=cache_dir, streaming=streaming, **options))


def _csv_as_text(path: Path) -> dict:
    """datasets' CSV options that read every column as a string (pandas' dtype from string features; no NaN)."""
    import csv

    with open(path, newline="", encoding="utf-8", errors="replace") as f:  # check_text_file reports bad bytes
        header = next(csv.reader(f), [])
    return dict(features=datasets.Features({name: datasets.Value("string") for name in header}),
                keep_default_na=False)


def _load_directory(path: Path, dataset_config, split: str, cache_dir, streaming):
    try:
        builder = datasets.load_dataset_builder(str(path), dataset_config, cache_dir=cache_dir)
    except (datasets.exceptions.DataFilesNotFoundError, datasets.data_files.EmptyDatasetError):
        raise FileNotFoundError(f"no data files under directory {path}; expected "
                                f"{' / '.join(BUILDER_BY_SUFFIX)} files") from None
    files = builder.config.data_files  # {split: [file, ...]}, resolved by datasets' own naming rules
    if split_name(split) not in files:
        raise ValueError(f"split '{split_name(split)}' not found in {path}: it has {[str(s) for s in files]} "
                         "(splits come from file names such as train.jsonl, test.jsonl, data/validation-*.parquet)")
    all_files = [Path(f) for name in files for f in files[name]]  # datasets prepares every split at once
    return _load_checked(builder, all_files, streaming, lambda: datasets.load_dataset(
        str(path), dataset_config, split=split, cache_dir=cache_dir, streaming=streaming))


def _load_checked(builder, files: list[Path], streaming: bool, load):
    """load(), with local text files checked first unless datasets will not read them (already prepared in the
    cache, keyed by the files' paths and modification times) or reads them lazily (streaming: a bad byte then fails
    where it is read); a JSON syntax error is located by file and line."""
    if not streaming and not Path(builder.cache_dir).is_dir():
        for f in files:
            check_text_file(f)
    try:
        return load()
    except datasets.exceptions.DatasetGenerationError:
        for f in files:
            if f.suffix in (".json", ".jsonl"):
                raise_on_bad_json(f)
        raise


def _load_saved(path: Path, split: str, streaming):
    saved = datasets.load_from_disk(str(path))
    if isinstance(saved, datasets.DatasetDict):
        if split_name(split) not in saved:
            raise ValueError(f"split '{split_name(split)}' not found in saved DatasetDict {path}: it has "
                             f"{list(saved)}")
        saved = saved[split_name(split)]
    saved = _slice(saved, split)
    return saved.to_iterable_dataset() if streaming else saved


def _slice(ds: datasets.Dataset, split: str) -> datasets.Dataset:
    """Apply a split's slice ("train[:10]", "train[50%:]", "train[:2]+train[-2:]") to an already-loaded split."""
    if "[" not in split:
        return ds
    name = split_name(split)
    spans = datasets.ReadInstruction.from_spec(split).to_absolute({name: len(ds)})
    return ds.select([i for s in spans for i in range(s.from_, s.to)])


# ---------------------------------------------------------------------------------------------------------------------
# File checks: one line naming the file and line


def check_text_file(path: Path) -> None:
    """ValueError if a local .json/.jsonl/.csv/.txt file is empty or not UTF-8 (reads it once, line by line)."""
    if path.suffix not in _TEXT_SUFFIXES:
        return
    empty = True
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not UTF-8 (byte 0x{line[err.start]:02x} at column "
                                 f"{err.start + 1}); re-encode the file as UTF-8") from None
            empty = empty and not line.strip()
    if empty:
        raise ValueError(f"{path}: the file is empty; expected at least one record")


def raise_on_bad_json(path: Path) -> None:
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
