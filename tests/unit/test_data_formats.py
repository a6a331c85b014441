"""Fine-tuning formats (openmoe/data_formats.py through openmoe/data.build_examples) on tiny files in
tests/assets/data, with the shipped test tokenizer: the rendered text and the loss mask of one record against
hand-written expectations, and the ids of a chat prompt against what inference feeds for it.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/unit/test_data_formats.py -q
"""

import copy
from pathlib import Path

import pytest

from openmoe.data import IGNORE_INDEX, DataSpec, build_examples, encode, load_records, load_tokenizer, tokenize_examples
from openmoe.data_formats import CHAT_SYSTEM, chat_prompt, detect_format, generation_prompt, record_segments

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "tests" / "assets" / "data"
TOKENIZER_DIR = ROOT / "tests" / "assets" / "tokenizer"
TRAIN_JSONL = ROOT / "data" / "sample" / "train.jsonl"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER_DIR)


def build(tok, tmp_path, name, **kw):
    spec = DataSpec(source=str(ASSETS / name), cache_dir=str(tmp_path / "cache"), max_length=kw.pop("max_length", 256),
                    **kw)
    return build_examples(spec, tok)


def trained_runs(tok, example):
    """The text of each run of consecutive trained positions (labels != IGNORE_INDEX), special tokens shown."""
    runs, run = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == token  # labels equal the ids where trained (the model shifts)
            run.append(token)
        elif run:
            runs, run = runs + [run], []
    runs += [run] if run else []
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def test_detect_format_precedence():
    assert detect_format(["messages", "text"]) == "chat"
    assert detect_format(["conversations", "id"]) == "sharegpt"
    assert detect_format(["instruction", "input", "output", "text"]) == "alpaca"
    assert detect_format(["prompt", "completion"]) == "prompt_completion"
    assert detect_format(["q", "a"], prompt_field="q", completion_field="a") == "prompt_completion"
    assert detect_format(["body"], text_field="body") == "text"
    assert detect_format(["question", "answer"]) is None


def test_no_examples_left_names_the_system_prompt_that_filled_the_window(tok, tmp_path):
    """OpenMoE-8B-Chat's default system prompt alone fills a short window: the error says so, with its length."""
    n = len(tok(CHAT_SYSTEM, add_special_tokens=False)["input_ids"])
    assert n > 64
    with pytest.raises(ValueError, match=rf"records have no token to train on within max_length=64 "
                                         rf"\(mask_prompt=True\); each prompt starts with the default system prompt "
                                         rf"\({n} tokens\): shorten it with --system_prompt; raise max_length"):
        build(tok, tmp_path, "alpaca.jsonl", max_length=64)
    assert len(build(tok, tmp_path, "alpaca.jsonl", max_length=64, system_prompt="Be brief.")) == 2


def test_alpaca_keeps_input_and_trains_on_output(tok, tmp_path):
    with_input, without_input = load_records(str(ASSETS / "alpaca.jsonl"), cache_dir=str(tmp_path / "c"))
    segments = record_segments(with_input, "alpaca", system="Be brief.")
    assert segments == [("<<SYS>>\nBe brief.\n<</SYS>>\n\n", False),
                        ("<s>[INST] Reverse the word.\n\nbottle [/INST]", False),
                        (" elttob </s>", True)]
    assert record_segments(without_input, "alpaca", system="Be brief.")[1] == (
        "<s>[INST] Name a primary colour. [/INST]", False)  # empty input: no separator
    examples = build(tok, tmp_path, "alpaca.jsonl", system_prompt="Be brief.")
    assert len(examples) == 2
    ex = examples[0]
    assert trained_runs(tok, ex) == ["elttob</s>"]
    assert ex["input_ids"][-1] == tok.eos_token_id  # the template's "</s>" is umT5's EOS token
    # the masked part is exactly what `infer.py --chat` feeds for this instruction
    prompt_ids = encode(tok, chat_prompt([("user", "Reverse the word.\n\nbottle")], "Be brief."))
    n = len(prompt_ids)
    assert ex["input_ids"][:n] == prompt_ids and ex["labels"][:n] == [IGNORE_INDEX] * n
    assert ex["labels"][n:] == ex["input_ids"][n:]


def test_chat_masks_all_but_assistant_turns(tok, tmp_path):
    record = load_records(str(ASSETS / "chat.jsonl"), cache_dir=str(tmp_path / "c"))[0]
    text = "".join(t for t, _ in record_segments(record, "chat"))
    assert text == ("<<SYS>>\nBe brief.\n<</SYS>>\n\n<s>[INST] Hi! [/INST] Hello. </s>"
                    "<s>[INST] Name a colour. [/INST] Blue. </s>")  # the record's own system turn
    ex = build(tok, tmp_path, "chat.jsonl")[0]
    assert trained_runs(tok, ex) == ["Hello.</s>", "Blue.</s>"]
    # up to the second answer the ids are what inference feeds for the same conversation
    turns = [("user", "Hi!"), ("assistant", "Hello."), ("user", "Name a colour.")]
    prompt_ids = encode(tok, chat_prompt(turns, "Be brief."))
    assert ex["input_ids"][:len(prompt_ids)] == prompt_ids
    # mask_prompt=False trains on every token but BOS
    unmasked = build(tok, tmp_path, "chat.jsonl", mask_prompt=False)[0]
    assert unmasked["input_ids"] == ex["input_ids"] and unmasked["labels"] == [IGNORE_INDEX] + ex["input_ids"][1:]


def test_chat_default_system_prompt(tok, tmp_path):
    record = load_records(str(ASSETS / "chat.jsonl"), cache_dir=str(tmp_path / "c"))[1]  # has no system turn
    segments = record_segments(record, "chat")
    assert segments[0] == (f"<<SYS>>\n{CHAT_SYSTEM}\n<</SYS>>\n\n", False)
    assert segments[1:] == [("<s>[INST] Add 2 and 3. [/INST]", False), (" 5 </s>", True)]


def test_sharegpt_roles_and_mask(tok, tmp_path):
    record = load_records(str(ASSETS / "sharegpt.json"), cache_dir=str(tmp_path / "c"))[1]
    assert "".join(t for t, _ in record_segments(record, "sharegpt")) == (
        "<<SYS>>\nAnswer in one word.\n<</SYS>>\n\n<s>[INST] Opposite of hot? [/INST] Cold </s>")
    examples = build(tok, tmp_path, "sharegpt.json", system_prompt="Be brief.")
    assert trained_runs(tok, examples[0]) == ["42</s>"] and trained_runs(tok, examples[1]) == ["Cold</s>"]


def test_records_with_nothing_to_train_are_dropped_with_a_warning(tok, tmp_path, caplog):
    # OpenMoE's default system prompt spells out to more than 64 tokens with the tiny test tokenizer, so record 0
    # (no system turn) has no assistant token within max_length; record 1 brings a short system prompt of its own
    examples = build(tok, tmp_path, "sharegpt.json", max_length=64)
    assert len(examples) == 1 and trained_runs(tok, examples[0]) == ["Cold</s>"]
    assert "1 of 2 records of " in caplog.text and "max_length=64 (mask_prompt=True) and were dropped" in caplog.text


def test_tokenizer_chat_template_is_used(tok, tmp_path):
    templated = copy.deepcopy(tok)
    templated.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
                               "{% elif m['role'] == 'assistant' %}Bot: {{ m['content'] }}</s>{% endif %}"
                               "{% endfor %}{% if add_generation_prompt %}Bot:{% endif %}")
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                           {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]}
    segments = record_segments(record, "chat", tokenizer=templated)
    assert segments == [("User: Hi\nBot:", False), (" Yo</s>", True), ("User: Bye\nBot:", False), (" Ciao</s>", True)]
    ex = build_examples(DataSpec(source=str(ASSETS / "chat.jsonl"), cache_dir=str(tmp_path / "c")), templated)[1]
    assert trained_runs(tok, ex) == ["5</s>"]
    # the inference prompt for the same conversation is the masked prefix training used
    assert generation_prompt(templated, [("user", "Hi"), ("assistant", "Yo"), ("user", "Bye")]) == (
        "User: Hi\nBot: Yo</s>User: Bye\nBot:")
    assert generation_prompt(tok, [("user", "Hi")], "Be brief.") == chat_prompt([("user", "Hi")], "Be brief.")


def test_prompt_completion_equals_list_reference(tok, tmp_path):
    """build_examples (datasets.map, optionally 2 processes) == tokenize_examples (a plain loop) on the sample."""
    records = load_records(str(TRAIN_JSONL), split="train[:40]", cache_dir=str(tmp_path / "c"))
    for mask_prompt in (False, True):
        reference = tokenize_examples(list(records), tok, 64, mask_prompt=mask_prompt)
        spec = DataSpec(source=str(TRAIN_JSONL), split="train[:40]", max_length=64, mask_prompt=mask_prompt,
                        cache_dir=str(tmp_path / "c"), num_proc=2 if mask_prompt else None)
        assert build_examples(spec, tok).to_list() == reference
    # default: no prompt masking for this format (today's behaviour)
    [ex] = build_examples(DataSpec(source=str(TRAIN_JSONL), split="train[:1]", cache_dir=str(tmp_path / "c")), tok)
    assert ex["labels"] == [IGNORE_INDEX] + ex["input_ids"][1:]


def test_raw_text_packs_without_truncation(tok, tmp_path):
    docs = [r["text"] for r in load_records(str(ASSETS / "text.jsonl"), cache_dir=str(tmp_path / "c"))]
    stream = [t for d in docs for t in encode(tok, d, add_eos=True)]  # [BOS] doc [EOS], document after document
    assert len(stream) > 16
    blocks = build(tok, tmp_path, "text.jsonl", max_length=16)  # shorter than one document: packing cuts, never drops
    assert [len(b) for b in blocks["input_ids"]] == [16] * (len(stream) // 16) + [len(stream) % 16]
    assert [t for b in blocks["input_ids"] for t in b] == stream
    labels = [t for b in blocks["labels"] for t in b]
    assert labels == [IGNORE_INDEX if t == tok.pad_token_id else t for t in stream]  # loss on every token but BOS
    assert labels.count(IGNORE_INDEX) == len(docs)
    # pack=False: one example per document, cut to max_length
    unpacked = build(tok, tmp_path, "text.jsonl", max_length=16, pack=False)
    assert len(unpacked) == len(docs) and all(len(ids) <= 16 for ids in unpacked["input_ids"])


def test_forced_format_and_field_names(tok, tmp_path):
    examples = build(tok, tmp_path, "alpaca.jsonl", data_format="prompt_completion", prompt_field="instruction",
                     completion_field="output")
    assert examples[0]["input_ids"] == encode(tok, "Reverse the word.elttob", add_eos=True)
    with pytest.raises(ValueError) as err:
        build(tok, tmp_path, "alpaca.jsonl", data_format="chat")
    message = str(err.value)
    assert message.startswith("record 0 of ")
    assert "does not fit the chat format: field 'messages' is NoneType" in message
    assert message.endswith("fields found: ['instruction', 'input', 'output']") and "\n" not in message


def test_record_that_fits_no_format_names_record_and_fields(tok, tmp_path):
    bad = tmp_path / "bad_chat.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                   '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
                   '{"role": "user", "content": "c"}]}\n')
    with pytest.raises(ValueError, match=r"^record 1 of .*bad_chat\.jsonl \(split 'train'\) does not fit the chat "
                                         r"format: the conversation ends with a 'user' turn.*fields found: "
                                         r"\['messages'\]$"):
        build_examples(DataSpec(source=str(bad), cache_dir=str(tmp_path / "c")), tok)
    tools = tmp_path / "tools.json"
    tools.write_text('[{"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "f"}]}]')
    with pytest.raises(ValueError, match=r"record 0 .*conversations\[1\] has from 'function_call'; accepted: "
                                         r"\['system', 'human', 'user', 'gpt', 'assistant'\]"):
        build_examples(DataSpec(source=str(tools), cache_dir=str(tmp_path / "c")), tok)
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(ValueError, match=r"cannot tell the data format of .*odd\.jsonl.* from the fields found "
                                         r"\['question', 'answer'\]; accepted: chat: 'messages'"):
        build_examples(DataSpec(source=str(odd), cache_dir=str(tmp_path / "c")), tok)
    with pytest.raises(ValueError, match=r"data_format 'xml' is not supported; accepted: \['auto', 'chat'"):
        build_examples(DataSpec(source=str(odd), data_format="xml"), tok)


def test_top_level_system_field():
    record = {"system": "Be terse.",
              "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}
    assert record_segments(record, "sharegpt", system="ignored")[0] == ("<<SYS>>\nBe terse.\n<</SYS>>\n\n", False)
    record = {"system": "Be terse.",
              "messages": [{"role": "system", "content": "Own."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Yo"}]}
    assert record_segments(record, "chat")[0] == ("<<SYS>>\nOwn.\n<</SYS>>\n\n", False)  # a system turn wins
