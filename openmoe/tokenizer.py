"""OpenMoE's tokenizer conventions, written as files that transformers reads without our code.

Training (openmoe/data.py) encodes with the umT5 sentencepiece model: `<pad>` (id 0) as BOS, the text's pieces with
sentencepiece's byte fallback, no appended `</s>`. transformers' own conversion of that model (T5TokenizerFast) drops
the byte fallback (unknown tokens instead of byte pieces), appends `</s>` and adds no BOS. So an export carries:
  tokenizer.json         the sentencepiece model converted with byte fallback and a `<pad> $A` post-processor
  tokenizer_config.json  class PreTrainedTokenizerFast (plain transformers, no trust_remote_code), padding_side
                         "left" (generation), chat_template = the OpenMoE-8B-Chat template (inference.chat_prompt)
and `AutoTokenizer.from_pretrained(dir)(text).input_ids == data.encode(tokenizer, text)`. No spiece.model beside
them: with one, openmoe.data.load_tokenizer would prefer the slow class.

    save_tokenizer(tokenizer, directory)   export (a training tokenizer or one loaded from an export)
    load_tokenizer(path)                   data.load_tokenizer, plus upstream's directories whose tokenizer_config.json
                                           names its custom OpenMoeTokenizer: read their spiece.model instead
"""

from __future__ import annotations

import json
import os
import warnings

from transformers import PreTrainedTokenizerFast, T5Tokenizer

from openmoe.data_formats import CHAT_SYSTEM

_SENTENCEPIECE_FILES = ("spiece.model", "tokenizer.model")


def _chat_template() -> str:
    """Jinja twin of inference.chat_prompt. Rendered text starts with "<pad> ": apply_chat_template tokenizes without
    special tokens, so the BOS is spelled out, and the space is the dummy prefix sentencepiece gives the text."""
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
        "{%- set turns = messages[1:] -%}{%- else -%}{%- set system = " + json.dumps(CHAT_SYSTEM) + " -%}"
        "{%- set turns = messages -%}{%- endif -%}"
        "{{ '<pad> <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}"
        "{%- for m in turns -%}"
        "{%- if m['role'] == 'user' -%}{{ '<s>[INST] ' + (m['content'] | trim) + ' [/INST]' }}"
        "{%- elif m['role'] == 'assistant' -%}{{ ' ' + (m['content'] | trim) + ' </s>' }}"
        "{%- else -%}{{ raise_exception(\"chat role '\" + m['role'] + \"' is not supported; accepted: "
        "'system' (first), 'user', 'assistant'\") }}{%- endif -%}"
        "{%- endfor -%}"
    )


CHAT_TEMPLATE = _chat_template()


def to_fast(tokenizer) -> PreTrainedTokenizerFast:
    """A fast tokenizer that encodes exactly as data.encode(tokenizer, text) (BOS added by the post-processor)."""
    from tokenizers import decoders, processors
    from transformers.convert_slow_tokenizer import T5Converter

    if isinstance(tokenizer, PreTrainedTokenizerFast):
        return tokenizer  # already converted (loaded from an export)
    if not isinstance(tokenizer, T5Tokenizer):
        raise ValueError(f"cannot export a {type(tokenizer).__name__} with OpenMoE's conventions; accepted: the "
                         "sentencepiece T5Tokenizer that openmoe.data.load_tokenizer builds")
    with warnings.catch_warnings():  # "byte fallback is not implemented": it is, two lines below
        warnings.simplefilter("ignore", UserWarning)
        converter = T5Converter(tokenizer)
    converter.handle_byte_fallback = bool(converter.proto.trainer_spec.byte_fallback)  # what sentencepiece does
    tok = converter.converted()
    pad, eos = tokenizer.pad_token, tokenizer.eos_token
    tok.post_processor = processors.TemplateProcessing(
        single=[pad, "$A"], pair=[pad, "$A", "$B"], special_tokens=[(pad, tokenizer.pad_token_id)])
    # pieces -> text as sentencepiece decodes: "▁" is a space, byte pieces <0xNN> are UTF-8 bytes, the dummy-prefix
    # space of the first piece goes (the same decoder transformers builds for LLaMA's byte-fallback model)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=pad, eos_token=eos, unk_token=tokenizer.unk_token, pad_token=pad,
        padding_side="left", chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],  # what the model takes (no token_type_ids)
        model_max_length=tokenizer.model_max_length)


def save_tokenizer(tokenizer, directory: str) -> None:
    """Write the tokenizer files of an export (module docstring) into `directory`. A tokenizer that is not the
    umT5-style sentencepiece one (a llama_moe model's LLaMA tokenizer, or one loaded from an export) is saved as is:
    its own conventions already load back through AutoTokenizer."""
    (to_fast(tokenizer) if isinstance(tokenizer, T5Tokenizer) else tokenizer).save_pretrained(directory)


def load_tokenizer(path):
    """openmoe.data.load_tokenizer, except that a directory whose tokenizer_config.json names a tokenizer class that
    transformers does not have (upstream's OpenMoeTokenizer, shipped as remote code) is read from its sentencepiece
    model with OpenMoE's conventions: no trust_remote_code, no code of theirs run."""
    from openmoe.data import load_tokenizer as load_plain

    path = str(path)
    custom = _custom_class(path)
    if custom is None:
        return load_plain(path)
    sp = [os.path.join(path, f) for f in _SENTENCEPIECE_FILES if os.path.isfile(os.path.join(path, f))]
    if not sp:
        raise FileNotFoundError(f"tokenizer directory {path} names the custom class {custom} and holds no "
                                f"sentencepiece model ({' / '.join(_SENTENCEPIECE_FILES)}) to read instead")
    return load_plain(sp[0])


def _custom_class(directory: str) -> str | None:
    """The tokenizer class a directory's tokenizer_config.json names when transformers lacks it, else None."""
    import transformers

    config = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        raw = json.load(f)
    name = raw.get("tokenizer_class")
    if "AutoTokenizer" in raw.get("auto_map", {}) or (name and not hasattr(transformers, name)):
        return name or str(raw["auto_map"]["AutoTokenizer"])
    return None
