"""openmoe/data.py on the shipped tokenizer and sample data (CPU, no colossalai).

    .venv/bin/python -m pytest tests/unit/test_data.py -q
"""

import json
import types
from pathlib import Path

import pytest
import torch

from openmoe.data import (
    IGNORE_INDEX,
    ShardedBatches,
    check_fields,
    check_vocab,
    collate,
    decode,
    encode,
    load_records,
    load_tokenizer,
    pack_examples,
    tokenize_examples,
)

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = ROOT / "tests" / "assets" / "tokenizer"
TRAIN_JSONL = ROOT / "data" / "sample" / "train.jsonl"
EVAL_JSONL = ROOT / "data" / "sample" / "eval.jsonl"

RECORD = {"prompt": "Add the two numbers.\n\nInput: 17 and 25\n\nOutput:", "completion": " 42"}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def sample_records():
    return [json.loads(line) for line in TRAIN_JSONL.read_text().splitlines()]


def make_examples(n, seed=0):
    """n examples of varied length whose first input id identifies them (ids are arbitrary, no tokenizer needed)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length = int(torch.randint(2, 9, (1,), generator=g))
        ids = [1000 + i] + torch.randint(3, 100, (length - 1,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]})
    return examples


def first_ids(batch):
    return batch["input_ids"][:, 0].tolist()


# --- tokenizer --------------------------------------------------------------------------------------------------------


def test_tokenizer_umt5_special_ids_and_size(tok):
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    assert tok.bos_token_id is None  # OpenMoE's BOS is <pad>; the tokenizer has none of its own
    assert len(tok) == 768 <= 1024  # tiny preset vocab_size; no <extra_id_*> sentinels appended
    assert (TOKENIZER_DIR / "spiece.model").stat().st_size < 1_000_000


def test_tokenizer_from_model_file_matches_directory(tok):
    from_file = load_tokenizer(TOKENIZER_DIR / "spiece.model")
    assert len(from_file) == len(tok)
    text = RECORD["prompt"] + RECORD["completion"]
    assert encode(from_file, text, add_eos=True) == encode(tok, text, add_eos=True)


def test_encode_pad_as_bos_and_single_eos(tok):
    text = "Write the word backwards.\n\nInput: garden\n\nOutput: nedrag"
    plain = tok.encode(text, add_special_tokens=False)
    assert 0 not in plain and 1 not in plain
    assert encode(tok, text) == [0] + plain  # default: BOS, no EOS (inference prompt)
    with_eos = encode(tok, text, add_eos=True)
    assert with_eos == [0] + plain + [1]
    assert with_eos.count(1) == 1  # T5Tokenizer's own EOS is not added on top
    assert with_eos == [0] + tok(text).input_ids  # the same ids as T5Tokenizer's default (EOS-appending) call
    assert encode(tok, text, add_bos=False) == plain


def test_byte_fallback_and_decode_round_trip(tok):
    text = "Héllo wörld, 42 plus 7."
    ids = encode(tok, text, add_eos=True)
    assert tok.unk_token_id not in ids  # byte fallback covers characters the sample data never had
    assert decode(tok, ids) == text
    assert decode(tok, torch.tensor(ids)) == text


def test_llama_style_tokenizer_starts_with_its_bos_and_pads_with_eos(tmp_path):
    """An upcycled LLaMA's tokenizer: <s> BOS, </s> EOS, no pad token. encode starts with its BOS (what LLaMA was
    trained with), padding falls back to EOS; one without eos, or without any start token, is refused."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tmp_path / "llama")
    llama = load_tokenizer(tmp_path / "llama")
    assert (llama.bos_token_id, llama.eos_token_id, llama.pad_token_id) == (1, 2, 2)
    assert encode(llama, "hello world", add_eos=True) == [1, 3, 4, 2]
    assert collate([{"input_ids": [1, 3], "labels": [-100, 3]}, {"input_ids": [1, 3, 4], "labels": [-100, 3, 4]}],
                   pad_id=llama.pad_token_id)["input_ids"].tolist() == [[1, 3, 2], [1, 3, 4]]
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                            eos_token="</s>").save_pretrained(tmp_path / "nostart")
    with pytest.raises(ValueError, match=r"has eos_token_id=2, pad_token_id=None, bos_token_id=None; accepted: "
                                         r"an eos token and a sequence start \(umT5's <pad>, or a bos token as "
                                         r"LLaMA's\)$"):
        load_tokenizer(tmp_path / "nostart")


def test_load_tokenizer_missing_path(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer.*spiece.model"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in directory .*spiece\.model"):
        load_tokenizer(tmp_path)  # exists, but holds nothing to load


def test_check_vocab(tok):
    check_vocab(tok, 1024)
    check_vocab(tok, 768)
    with pytest.raises(ValueError, match=r"tokenizer has 768 tokens but the model's vocab_size is 512"):
        check_vocab(tok, 512)


# --- records ----------------------------------------------------------------------------------------------------------


def test_load_shipped_jsonl(tmp_path):
    train = load_records(str(TRAIN_JSONL), cache_dir=str(tmp_path))
    assert 300 <= len(train) <= 600
    assert train.column_names == ["prompt", "completion"]
    assert train[0]["prompt"].endswith("Output:") and train[0]["completion"].startswith(" ")
    evaluation = load_records(str(EVAL_JSONL), split="validation", cache_dir=str(tmp_path))
    assert 0 < len(evaluation) < len(train)
    assert not set(evaluation["prompt"]) & set(train["prompt"])  # eval prompts are unseen in training
    # the directory keeps its files' splits apart (datasets' naming rules: "eval" in a file name means test)
    assert len(load_records(str(TRAIN_JSONL.parent), cache_dir=str(tmp_path))) == len(train)
    assert len(load_records(str(TRAIN_JSONL.parent), split="test", cache_dir=str(tmp_path))) == len(evaluation)
    assert len(load_records(str(TRAIN_JSONL), split="train[:10]", cache_dir=str(tmp_path))) == 10


def test_load_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    load_records(str(EVAL_JSONL), cache_dir=str(tmp_path / "cache")).to_parquet(str(path))
    ds = load_records(str(path), cache_dir=str(tmp_path / "cache"))
    assert ds.column_names == ["prompt", "completion"] and len(ds) == len(EVAL_JSONL.read_text().splitlines())


def test_load_records_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(str(missing), cache_dir=str(tmp_path))


def test_load_records_malformed_jsonl_names_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": \n{"prompt": "d"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON"):
        load_records(str(bad), cache_dir=str(tmp_path / "cache"))


def test_check_fields_lists_missing_and_found(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    ds = load_records(str(path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError) as err:
        check_fields(ds, ["prompt", "completion"])
    message = str(err.value)
    assert "['prompt', 'completion']" in message and "fields found: ['instruction', 'output']" in message
    assert "\n" not in message
    check_fields([{"prompt": "p", "completion": "c"}], ["prompt", "completion"])
    with pytest.raises(ValueError, match=r"missing field\(s\) \['completion'\]; fields found: \['prompt'\]"):
        tokenize_examples([{"prompt": "p"}], None, 16)


# --- tokenize / pack --------------------------------------------------------------------------------------------------


def test_tokenize_bos_eos_and_labels(tok):
    [ex] = tokenize_examples([RECORD], tok, max_length=128)
    full = encode(tok, RECORD["prompt"] + RECORD["completion"], add_eos=True)
    assert ex["input_ids"] == full
    assert ex["input_ids"][0] == 0 and ex["input_ids"][-1] == 1
    assert ex["labels"] == [IGNORE_INDEX] + full[1:]  # BOS is never a target; EOS is


def test_tokenize_mask_prompt(tok):
    [ex] = tokenize_examples([RECORD], tok, max_length=128, mask_prompt=True)
    n_prompt = len(encode(tok, RECORD["prompt"], add_bos=False))
    assert ex["input_ids"] == encode(tok, RECORD["prompt"] + RECORD["completion"], add_eos=True)  # ids unchanged
    assert ex["labels"][:1 + n_prompt] == [IGNORE_INDEX] * (1 + n_prompt)
    assert ex["labels"][1 + n_prompt:] == ex["input_ids"][1 + n_prompt:]
    trained = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert trained[-1] == 1 and decode(tok, trained) == "42"


def test_tokenize_truncates_without_eos(tok):
    full = encode(tok, RECORD["prompt"] + RECORD["completion"], add_eos=True)
    [ex] = tokenize_examples([RECORD], tok, max_length=8)
    assert ex["input_ids"] == full[:8] and len(ex["labels"]) == 8
    assert 1 not in ex["input_ids"]


def test_tokenize_drops_fully_masked_and_errors_when_none_left(tok):
    other = {"prompt": "Hi.\n\nOutput:", "completion": " hello"}
    examples = tokenize_examples([RECORD, other], tok, max_length=8, mask_prompt=True)
    assert len(examples) == 1 and examples[0]["input_ids"][:3] == encode(tok, other["prompt"])[:3]
    with pytest.raises(ValueError, match="no examples left after tokenization: all 1 records"):
        tokenize_examples([RECORD], tok, max_length=8, mask_prompt=True)


def test_tokenize_text_field(tok):
    [ex] = tokenize_examples([{"text": "The cat walks to the park."}], tok, max_length=64, text_field="text")
    assert ex["input_ids"] == encode(tok, "The cat walks to the park.", add_eos=True)
    assert ex["labels"] == [IGNORE_INDEX] + ex["input_ids"][1:]


def test_tokenize_whole_sample_fits(tok, sample_records):
    examples = tokenize_examples(sample_records, tok, max_length=128, mask_prompt=True)
    assert len(examples) == len(sample_records)
    assert all(ex["input_ids"][-1] == 1 for ex in examples)  # nothing truncated at 128
    assert max(len(ex["input_ids"]) for ex in examples) <= 64


def test_pack_preserves_all_tokens(tok, sample_records):
    examples = tokenize_examples(sample_records[:40], tok, max_length=128)
    packed = pack_examples(examples, max_length=64)
    def flat(exs, key):
        return [t for ex in exs for t in ex[key]]

    assert flat(packed, "input_ids") == flat(examples, "input_ids")
    assert flat(packed, "labels") == flat(examples, "labels")
    assert all(len(b["input_ids"]) == 64 for b in packed[:-1]) and 0 < len(packed[-1]["input_ids"]) <= 64
    assert sum(t == 0 for t in flat(packed, "input_ids")) == 40  # one BOS per document, labels -100
    batch = collate(packed)
    assert batch["attention_mask"][:-1].all()


# --- collate ----------------------------------------------------------------------------------------------------------


def test_collate_right_pads_with_ignore_labels():
    examples = [{"input_ids": [0, 5, 6, 1], "labels": [-100, 5, 6, 1]}, {"input_ids": [0, 7], "labels": [-100, 7]}]
    batch = collate(examples, pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (2, 4) and t.device.type == "cpu" for t in batch.values())
    assert batch["input_ids"].tolist() == [[0, 5, 6, 1], [0, 7, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6, 1], [-100, 7, -100, -100]]
    assert collate(examples, pad_to_multiple_of=8)["input_ids"].shape == (2, 8)
    fixed = collate(examples, max_length=6)
    assert fixed["labels"].shape == (2, 6) and (fixed["labels"][:, 4:] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="more than max_length"):
        collate(examples, max_length=3)


# --- sharded batches --------------------------------------------------------------------------------------------------


def test_sharding_disjoint_and_union_is_single_process_batch():
    examples = make_examples(50)
    batch_size, dp_size, max_length = 3, 4, 8
    single = ShardedBatches(examples, batch_size * dp_size, seed=7, max_length=max_length)
    ranks = [ShardedBatches(examples, batch_size, r, dp_size, seed=7, max_length=max_length) for r in range(dp_size)]
    assert len(single) == len(ranks[0]) == 50 // 12
    for epoch in range(2):
        seen = set()
        rank_iters = [r.epoch_batches(epoch) for r in ranks]
        for global_batch in single.epoch_batches(epoch):
            per_rank = [next(it) for it in rank_iters]
            for key in global_batch:
                assert torch.equal(torch.cat([b[key] for b in per_rank]), global_batch[key])
            ids = [first_ids(b) for b in per_rank]
            flat = [i for rank_ids in ids for i in rank_ids]
            assert len(set(flat)) == len(flat) == batch_size * dp_size  # ranks disjoint within a step
            assert not seen & set(flat)  # and across steps of an epoch
            seen |= set(flat)
        assert all(next(it, None) is None for it in rank_iters)
    assert single.epoch_order(0) != single.epoch_order(1)
    assert single.epoch_order(0) == ShardedBatches(examples, 12, seed=7).epoch_order(0)
    assert single.epoch_order(0) != ShardedBatches(examples, 12, seed=8).epoch_order(0)


def test_no_drop_last_wraps_to_full_batches():
    examples = make_examples(10)
    ranks = [ShardedBatches(examples, 2, r, 2, seed=1, drop_last=False) for r in range(2)]
    assert len(ranks[0]) == 3  # ceil(10 / 4)
    batches = [list(r.epoch_batches(0)) for r in ranks]
    assert all(b["input_ids"].shape[0] == 2 for rank in batches for b in rank)
    ids = {i for rank in batches for b in rank for i in first_ids(b)}
    assert ids == {1000 + i for i in range(10)}  # every example once, 2 repeats fill the last batch


def test_resume_yields_identical_next_batch():
    examples = make_examples(30)
    reference = ShardedBatches(examples, 2, 1, 2, seed=3)  # 7 batches per epoch
    stream = [b for _, b in zip(range(12), reference)]  # runs into epoch 1
    for stop in (3, 7, 9):  # mid-epoch, exactly at the epoch boundary, into the next epoch
        run = ShardedBatches(examples, 2, 1, 2, seed=3)
        for _ in zip(range(stop), run):
            pass
        state = run.state_dict()
        assert (state["epoch"], state["batch_index"]) == divmod(stop, 7)
        resumed = ShardedBatches(examples, 2, 1, 2, seed=3)
        resumed.load_state_dict(state)
        nxt = next(iter(resumed))
        assert all(torch.equal(nxt[k], stream[stop][k]) for k in nxt)
    # explicit epoch/start_batch form gives the same batch
    again = next(ShardedBatches(examples, 2, 1, 2, seed=3).epoch_batches(1, start_batch=2))
    assert torch.equal(again["input_ids"], stream[9]["input_ids"])


def test_resume_with_other_dp_size_same_global_batch():
    examples = make_examples(40)
    run = ShardedBatches(examples, 4, 0, 1, seed=5)
    for _ in zip(range(3), run):
        pass
    expected = next(iter(run))
    halves = []
    for rank in range(2):
        resumed = ShardedBatches(examples, 2, rank, 2, seed=5)
        resumed.load_state_dict(run.state_dict() | {"batch_index": 3})
        halves += first_ids(next(iter(resumed)))
    assert halves == first_ids(expected)


def test_resume_rejects_mismatched_state():
    examples = make_examples(20)
    state = ShardedBatches(examples, 2, seed=0).state_dict()
    with pytest.raises(ValueError, match="saved seed=0 but this run has 1"):
        ShardedBatches(examples, 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="saved global_batch_size=2 but this run has 4"):
        ShardedBatches(examples, 4, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="saved num_examples=20 but this run has 21"):
        ShardedBatches(make_examples(21), 2, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match=r"saved batch_index \(10\) out of range \[0, 10\)"):
        ShardedBatches(examples, 2, seed=0).load_state_dict({**state, "batch_index": 10})


def test_sharded_batches_validation():
    with pytest.raises(ValueError, match="the dataset is empty"):
        ShardedBatches([], 2)
    with pytest.raises(ValueError, match="3 examples do not fill one global batch of 4"):
        ShardedBatches(make_examples(3), 2, 0, 2)
    with pytest.raises(ValueError, match=r"dp_rank \(2\) must be in \[0, dp_size\)"):
        ShardedBatches(make_examples(8), 2, 2, 2)


# --- shipped assets ---------------------------------------------------------------------------------------------------


def test_assets_are_reproducible(tmp_path):
    """scripts/make_assets.py rebuilds byte-identical data and tokenizer files (built here under tmp_path)."""
    script = ROOT / "scripts" / "make_assets.py"
    make_assets = types.ModuleType("make_assets")
    make_assets.__file__ = str(script)
    exec(compile(script.read_text(), str(script), "exec"), make_assets.__dict__)  # no .pyc written next to it
    make_assets.build(tmp_path)
    for rel in make_assets.OUTPUTS:
        assert (tmp_path / rel).read_bytes() == (ROOT / rel).read_bytes(), rel
