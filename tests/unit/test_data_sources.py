"""Data sources (openmoe/data_sources.py) and evaluation data (openmoe/data.py): split-aware local directories,
save_to_disk directories, a Hub id loaded offline from a local cache, csv/txt files, file errors, eval splits and
eval batches. Fixtures are written under tmp_path; the shipped test tokenizer tokenizes.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/unit/test_data_sources.py -q
"""

import os
from pathlib import Path

import datasets
import pytest
import torch
from datasets.packaged_modules.json import json as json_builder

from openmoe.data import (
    IGNORE_INDEX,
    DataSpec,
    ShardedBatches,
    StreamingBatches,
    build_eval_examples,
    build_examples,
    encode,
    eval_batches,
    load_records,
    load_tokenizer,
)

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = ROOT / "tests" / "assets" / "tokenizer"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER_DIR)


def pc_rows(n, tag):
    return [{"prompt": f"Q{tag}{i}:", "completion": f" a{i}"} for i in range(n)]


@pytest.fixture
def snapshot(tmp_path):
    """An HF snapshot layout: data/train-*.parquet (5 rows) and data/test-*.parquet (3 rows)."""
    root = tmp_path / "snapshot"
    (root / "data").mkdir(parents=True)
    datasets.Dataset.from_list(pc_rows(5, "train")).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(pc_rows(3, "test")).to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    return root


def test_snapshot_directory_keeps_splits_apart(snapshot, tmp_path):
    cache = str(tmp_path / "cache")
    train = load_records(str(snapshot), split="train", cache_dir=cache)
    test = load_records(str(snapshot), split="test", cache_dir=cache)
    assert (len(train), len(test)) == (5, 3)
    assert train["prompt"] == [f"Qtrain{i}:" for i in range(5)] and test["prompt"] == [f"Qtest{i}:" for i in range(3)]
    assert len(load_records(str(snapshot), split="train[:2]", cache_dir=cache)) == 2
    with pytest.raises(ValueError, match=r"split 'validation' not found in .*snapshot: it has \['train', 'test'\]"):
        load_records(str(snapshot), split="validation", cache_dir=cache)


def test_named_files_directory(tmp_path):
    root = tmp_path / "named"
    root.mkdir()
    for name, n in (("train.jsonl", 4), ("validation.jsonl", 2)):
        datasets.Dataset.from_list(pc_rows(n, name)).to_json(str(root / name))
    cache = str(tmp_path / "cache")
    assert len(load_records(str(root), cache_dir=cache)) == 4
    assert len(load_records(str(root), split="validation", cache_dir=cache)) == 2


def test_save_to_disk_directories(tok, tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(pc_rows(6, "train")),
                               "test": datasets.Dataset.from_list(pc_rows(2, "test"))})
    dd.save_to_disk(str(tmp_path / "dict"))
    dd["train"].save_to_disk(str(tmp_path / "single"))
    assert len(load_records(str(tmp_path / "dict"), split="test")) == 2
    assert load_records(str(tmp_path / "dict"), split="train[-2:]")["prompt"] == ["Qtrain4:", "Qtrain5:"]
    with pytest.raises(ValueError, match=r"split 'validation' not found in saved DatasetDict .*dict: it has "
                                         r"\['train', 'test'\]"):
        load_records(str(tmp_path / "dict"), split="validation")
    single = load_records(str(tmp_path / "single"))
    assert single.column_names == ["prompt", "completion"] and len(single) == 6  # not dataset_info.json as data
    # and it trains: examples -> full fixed-length batches
    examples = build_examples(DataSpec(source=str(tmp_path / "single"), max_length=16), tok)
    assert examples[0]["input_ids"] == encode(tok, "Qtrain0: a0", add_eos=True)
    batch = next(iter(ShardedBatches(examples, 3, max_length=16)))
    assert batch["input_ids"].shape == (3, 16) and (batch["labels"] != IGNORE_INDEX).any()


def test_hub_id_from_local_cache_offline(tmp_path, monkeypatch):
    """The real load_dataset(hub id) path with the Hub offline: it finds the copy a builder prepared in cache_dir
    (laid out as a download of "tiny-org/tiny-qa" would be)."""
    cache = tmp_path / "hub_cache"
    src = tmp_path / "src.jsonl"
    datasets.Dataset.from_list(pc_rows(7, "hub")).to_json(str(src))
    builder = json_builder.Json(data_files={"train": str(src)}, cache_dir=str(cache), dataset_name="tiny-qa",
                                repo_id="tiny-org/tiny-qa", hash="0" * 40)
    builder.download_and_prepare()
    [config_dir] = list((cache / "tiny-org___tiny-qa").iterdir())
    config_dir.rename(config_dir.parent / "default")  # a Hub download names the config directory "default"
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    records = load_records("tiny-org/tiny-qa", split="train", cache_dir=str(cache))
    assert records["prompt"] == [f"Qhub{i}:" for i in range(7)]
    assert len(load_records("tiny-org/tiny-qa", split="train[:3]", cache_dir=str(cache))) == 3


def test_csv_and_txt_files(tok, tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text('prompt,completion\n"Say, hi:", hi\nCount:, 1 2\n')
    assert load_records(str(csv), cache_dir=str(tmp_path / "c"))[0] == {"prompt": "Say, hi:", "completion": " hi"}
    with pytest.raises(ValueError, match=r"^split 'train\[:abc\]' of \S+d\.csv is not a split name or slice \(.*\); "
                                         r"accepted: NAME, NAME\[:N\], NAME\[A:B\] or NAME\[A%:B%\], e\.g\. "
                                         r"train\[:1000\] or train\[90%:\]$"):
        load_records(str(csv), split="train[:abc]", cache_dir=str(tmp_path / "c"))
    # cells are text as written: pandas would read " 1" as the int 1 and an empty cell as NaN
    numbers = tmp_path / "n.csv"
    numbers.write_text('prompt,completion\nOne:, 1\nNone:,\n')
    assert list(load_records(str(numbers), cache_dir=str(tmp_path / "c"))) == [
        {"prompt": "One:", "completion": " 1"}, {"prompt": "None:", "completion": ""}]
    txt = tmp_path / "corpus.txt"
    txt.write_text("first line of text\nsecond line\n")
    examples = build_examples(DataSpec(source=str(txt), max_length=8, cache_dir=str(tmp_path / "c")), tok)
    stream = encode(tok, "first line of text", add_eos=True) + encode(tok, "second line", add_eos=True)
    assert [t for ids in examples["input_ids"] for t in ids] == stream  # the text format, packed


def test_file_errors_name_file_and_line(tmp_path):
    cache = str(tmp_path / "cache")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"^\S*empty\.jsonl: the file is empty; expected at least one record$"):
        load_records(str(empty), cache_dir=cache)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_text('{"prompt": "a", "completion": "b"}\n')
    assert len(load_records(str(latin1), cache_dir=cache)) == 1  # prepared and cached: later loads skip the checks
    latin1.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    os.utime(latin1, ns=(latin1.stat().st_atime_ns, latin1.stat().st_mtime_ns + 10**9))  # a later modification
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8 \(byte 0xe9 at column 16\); re-encode"):
        load_records(str(latin1), cache_dir=cache)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": \n')
    with pytest.raises(ValueError, match=r"train\.jsonl:2: invalid JSON line"):
        load_records(str(folder), cache_dir=cache)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("no data here\n")
    with pytest.raises(FileNotFoundError, match=r"no data files under directory \S*notes; expected \.json / \.jsonl"):
        load_records(str(tmp_path / "notes"), cache_dir=cache)


def test_eval_examples_from_a_split_or_a_file(tok, snapshot, tmp_path):
    cache = str(tmp_path / "cache")
    assert build_eval_examples(DataSpec(source=str(snapshot), cache_dir=cache), tok) is None  # no eval asked
    spec = DataSpec(source=str(snapshot), eval_split="test", cache_dir=cache, max_length=16)
    evaluation = build_eval_examples(spec, tok)
    assert [ids for ids in evaluation["input_ids"]] == [encode(tok, f"Qtest{i}: a{i}", add_eos=True) for i in range(3)]
    assert len(build_eval_examples(DataSpec(source=str(snapshot), eval_split="test", eval_samples=2, cache_dir=cache),
                                   tok)) == 2
    train_file = tmp_path / "train.jsonl"
    datasets.Dataset.from_list(pc_rows(4, "f")).to_json(str(train_file))
    with pytest.raises(ValueError, match=r"train\.jsonl holds a single split, so eval_split 'validation' would "
                                         r"evaluate on the training data; pass a separate file as eval_source "
                                         r"\(--eval_dataset on the command line\)"):
        build_eval_examples(DataSpec(source=str(train_file), eval_split="validation", cache_dir=cache), tok)
    with pytest.raises(ValueError, match=r"eval_split 'train\[:2\]' is the training split of"):
        build_eval_examples(DataSpec(source=str(snapshot), eval_split="train[:2]", cache_dir=cache), tok)
    separate = build_eval_examples(DataSpec(source=str(train_file), eval_source=str(snapshot / "data" /
                                            "test-00000-of-00001.parquet"), cache_dir=cache), tok)
    assert len(separate) == 3


def test_eval_batches_cover_every_example_once_on_equal_shapes():
    examples = [{"input_ids": [0, 100 + i, 1], "labels": [IGNORE_INDEX, 100 + i, 1]} for i in range(7)]
    batch_size, dp_size = 2, 2
    per_rank = [list(eval_batches(examples, batch_size, r, dp_size, max_length=4)) for r in range(dp_size)]
    assert [len(b) for b in per_rank] == [2, 2]  # ceil(7 / 4) steps on every rank
    assert all(b["input_ids"].shape == (2, 4) for rank in per_rank for b in rank)
    targets = torch.cat([b["labels"] for rank in per_rank for b in rank])
    seen = sorted(t for t in targets.flatten().tolist() if t >= 100)
    assert seen == [100 + i for i in range(7)]  # every example once; the filler row adds no target
    assert (targets != IGNORE_INDEX).sum() == 7 * 2
    # step 1 of rank 1 holds example 6 and the filler (a copy of example 0 with no targets)
    last = per_rank[1][1]
    assert last["input_ids"][:, :3].tolist() == [[0, 106, 1], [0, 100, 1]]
    assert last["labels"][1].tolist() == [IGNORE_INDEX] * 4


def test_streaming_matches_prepared_and_resumes(tok, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    datasets.Dataset.from_list([{"text": f"document number {i} " + "word " * (i % 5)} for i in range(30)]).to_json(
        str(corpus))
    spec = DataSpec(source=str(corpus), max_length=8, cache_dir=str(tmp_path / "c"))
    prepared = build_examples(spec, tok)
    streamed = build_examples(DataSpec(source=str(corpus), max_length=8, streaming=True), tok)
    assert isinstance(streamed, datasets.IterableDataset)
    assert list(streamed) == prepared.to_list()  # same tokenization and packing, read lazily
    n = len(prepared)
    # two ranks' slices concatenate to the single-process batch, in stream order, full batches only
    single = StreamingBatches(streamed, 4, max_length=8)
    ranks = [StreamingBatches(streamed, 2, r, 2, max_length=8) for r in range(2)]
    epoch = list(single.epoch_batches(0))
    assert len(epoch) == n // 4
    for b, (x, y) in enumerate(zip(*[r.epoch_batches(0) for r in ranks])):
        assert torch.equal(torch.cat([x["input_ids"], y["input_ids"]]), epoch[b]["input_ids"])
        assert epoch[b]["input_ids"][0, :len(prepared[4 * b]["input_ids"])].tolist() == prepared[4 * b]["input_ids"]
    # resume (shuffled stream): the batch after a saved position equals the uninterrupted run's
    reference = [b["input_ids"] for _, b in zip(range(n // 4 + 2), StreamingBatches(streamed, 4, seed=3,
                                                                                     shuffle_buffer=8))]
    assert not torch.equal(reference[0], epoch[0]["input_ids"])  # the buffer shuffles
    for stop in (2, n // 4 + 1):  # mid-epoch, and into epoch 1
        run = StreamingBatches(streamed, 4, seed=3, shuffle_buffer=8)
        for _ in zip(range(stop), run):
            pass
        resumed = StreamingBatches(streamed, 4, seed=3, shuffle_buffer=8)
        resumed.load_state_dict(run.state_dict())
        assert torch.equal(next(iter(resumed))["input_ids"], reference[stop])
    with pytest.raises(ValueError, match="saved shuffle_buffer=8 but this run has 0"):
        StreamingBatches(streamed, 4, seed=3).load_state_dict(run.state_dict())
    with pytest.raises(ValueError, match=r"the stream does not fill one global batch of 64 examples"):
        next(iter(StreamingBatches(streamed, 32, 0, 2)))


def test_tokenized_examples_are_cached_on_disk(tok, tmp_path):
    """A second build (a later run, or another rank after the first) reads datasets' cache file instead of
    tokenizing again; a different rendering gets its own file."""
    spec = DataSpec(source=str(ROOT / "data" / "sample" / "eval.jsonl"), cache_dir=str(tmp_path / "c"))
    first = build_examples(spec, tok)
    [cache_file] = {f["filename"] for f in first.cache_files} - {f["filename"] for f in load_records(
        spec.source, cache_dir=spec.cache_dir).cache_files}
    written = os.stat(cache_file).st_mtime_ns
    again = build_examples(spec, tok)
    assert [f["filename"] for f in again.cache_files] == [cache_file] and os.stat(cache_file).st_mtime_ns == written
    masked = build_examples(DataSpec(source=spec.source, cache_dir=spec.cache_dir, mask_prompt=True), tok)
    assert [f["filename"] for f in masked.cache_files] != [cache_file] and masked.to_list() != first.to_list()


def test_uncached_hub_dataset_without_network_is_one_line(monkeypatch):
    """A hub dataset id that is not in the cache, with the hub unreachable (offline mode here; without network the
    same after the hub client's retries): one ValueError line, not a ConnectionError traceback."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"^Hub dataset 'someone/not-cached' is neither a local path nor in the "
                                         r"datasets cache, and the Hub could not be reached \(.*\); download it"):
        load_records("someone/not-cached")
