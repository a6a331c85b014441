"""Fine-tuning data formats: which format a dataset is in, and how one record renders to text with a loss mask.

Pure string functions (no torch, no tokenizer import): a record becomes a list of segments `(text, is_response)`;
openmoe/data.py tokenizes the concatenated text once and labels each segment's tokens (the response segments are
always trained; the others only when the prompt is not masked). The OpenMoE-8B-Chat template lives here, the one
place shared by training (chat, ShareGPT and Alpaca records) and inference (`infer.py --chat`).

Formats (`data_format`), detected from the dataset's fields in this order when "auto":
  chat               `messages: [{role, content}]`, roles system (first, optional; or a top-level `system` field) /
                     user / assistant, alternating from user and ending with assistant. Rendered with the chat
                     template; loss on assistant turns.
  sharegpt           `conversations: [{from, value}]`, from system / human (or user) / gpt (or assistant), optional
                     top-level `system`; rendered and masked as chat.
  alpaca             `instruction`, `output`, optional `input` and `system`: one user turn "instruction" (followed by
                     "\n\n" + input when input is not empty), one assistant turn "output"; rendered and masked as chat.
  prompt_completion  `prompt_field`, `completion_field` (default prompt / completion): plain text prompt + completion
                     (upstream OpenMoE fine-tuning, `yizhongw/self_instruct`); the loss skips the prompt only if
                     mask_prompt. EOS is appended.
  text               `text_field` (default text): raw text for continued pre-training, loss on every token, EOS
                     appended; packed by default.

Chat template: the tokenizer's own `chat_template` when it has one (the response segments are found by rendering the
conversation up to each assistant turn; the template must render a conversation as a prefix of its continuation),
else OpenMoE-8B-Chat's (LLaMA-2 style, see `chat_segments`); `generation_prompt` renders the matching inference
prompt for either. The `</s>` text that closes each assistant turn is umT5's EOS token (the tokenizer parses special
tokens in text), so the model learns to stop.
"""

from __future__ import annotations

FORMATS = ("auto", "chat", "sharegpt", "alpaca", "prompt_completion", "text")
CHAT_FORMATS = ("chat", "sharegpt", "alpaca")  # rendered with the chat template; prompt masked by default

# The system prompt OpenMoE-8B-Chat was tuned with (LLaMA-2 chat style).
CHAT_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering something "
    "not correct. If you don't know the answer to a question, please don't share false information."
)

_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


# ---------------------------------------------------------------------------------------------------------------------
# The chat template


def chat_segments(turns: list[tuple[str, str]], system: str = CHAT_SYSTEM) -> list[tuple[str, bool]]:
    """OpenMoE-8B-Chat template as segments (text, is_assistant): the <<SYS>> block, then `<s>[INST] user [/INST]`
    per user turn and ` assistant </s>` per assistant turn. turns: [("user", text), ("assistant", text), ...]
    alternating from a user turn; contents are stripped."""
    segments = [(f"<<SYS>>\n{system}\n<</SYS>>\n\n", False)]
    for i, (role, content) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role not in ("user", "assistant"):
            raise ValueError(f"chat role '{role}' is not supported; accepted: 'user', 'assistant'")
        if role != expected:
            raise ValueError(f"chat turn {i} is '{role}' but turns must alternate user, assistant, ... "
                             f"(turn {i} must be '{expected}')")
        if role == "user":
            segments.append((f"<s>[INST] {content.strip()} [/INST]", False))
        else:
            segments.append((f" {content.strip()} </s>", True))
    return segments


def chat_prompt(turns: list[tuple[str, str]], system: str = CHAT_SYSTEM) -> str:
    """Inference prompt in the OpenMoE-8B-Chat template (ends with a user turn, the model answers next).
    turns: [("user", text), ("assistant", text), ..., ("user", text)]."""
    if not turns or turns[-1][0] != "user":
        raise ValueError("a chat prompt must end with a user turn")
    return "".join(text for text, _ in chat_segments(turns, system))


def generation_prompt(tokenizer, turns: list[tuple[str, str]], system: str | None = None) -> str:
    """The inference prompt for `turns` in the template training used for this tokenizer: its own chat_template
    when it has one, else OpenMoE-8B-Chat's (system None: the template's default system prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        return chat_prompt(turns, CHAT_SYSTEM if system is None else system)
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": role, "content": content} for role, content in turns]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def template_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """Segments of `messages` rendered with the tokenizer's own chat_template: for each assistant turn, the text up to
    it (with the generation prompt) is a prompt segment and the text it adds is a response segment."""
    def render(msgs, generation_prompt):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, full = render(messages[:i], True), render(messages[:i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("the tokenizer's chat_template does not render a conversation as a prefix of its "
                             "continuation, so assistant turns cannot be located for the loss mask")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return segments


# ---------------------------------------------------------------------------------------------------------------------
# Detection and rendering


def detect_format(fields, prompt_field: str = "prompt", completion_field: str = "completion",
                  text_field: str = "text") -> str | None:
    """The format a dataset with these field (column) names is in, by the precedence in the module docstring; None
    if none fits."""
    fields = set(fields)
    if "messages" in fields:
        return "chat"
    if "conversations" in fields:
        return "sharegpt"
    if {"instruction", "output"} <= fields:
        return "alpaca"
    if {prompt_field, completion_field} <= fields:
        return "prompt_completion"
    if text_field in fields:
        return "text"
    return None


def format_fields(data_format: str, prompt_field: str = "prompt", completion_field: str = "completion",
                  text_field: str = "text") -> str:
    """What a record of `data_format` needs, for error messages."""
    return {"chat": "'messages' (a list of {role, content})",
            "sharegpt": "'conversations' (a list of {from, value})",
            "alpaca": "'instruction' and 'output' (optional 'input', 'system')",
            "prompt_completion": f"'{prompt_field}' and '{completion_field}'",
            "text": f"'{text_field}'"}[data_format]


class RecordError(ValueError):
    """A record that does not fit its format; the caller adds the record index and the fields found."""


def record_segments(record: dict, data_format: str, *, prompt_field: str = "prompt",
                    completion_field: str = "completion", text_field: str = "text", system: str | None = None,
                    tokenizer=None) -> list[tuple[str, bool]]:
    """Render one record as segments (text, is_response). system: the chat system prompt when the record has none
    (None: OpenMoE-8B-Chat's, or the tokenizer template's own default). tokenizer: used only for its chat_template,
    when it has one."""
    if data_format == "prompt_completion":
        return [(_text(record, prompt_field), False), (_text(record, completion_field), True)]
    if data_format == "text":
        return [(_text(record, text_field), True)]
    if data_format == "alpaca":
        user = _text(record, "instruction")
        if record.get("input"):
            user += "\n\n" + _text(record, "input")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(record, "output")}]
        if record.get("system"):
            messages.insert(0, {"role": "system", "content": _text(record, "system")})
    elif data_format in ("chat", "sharegpt"):
        if data_format == "chat":
            roles = {r: r for r in ("system", "user", "assistant")}
            messages = _messages(record, "messages", "role", "content", roles)
        else:
            messages = _messages(record, "conversations", "from", "value", _SHAREGPT_ROLES)
        if record.get("system") and messages[0]["role"] != "system":  # a top-level system field (LLaMA-Factory)
            messages.insert(0, {"role": "system", "content": _text(record, "system")})
    else:
        raise ValueError(f"data_format '{data_format}' is not supported; accepted: {list(FORMATS[1:])}")
    return _render_chat(messages, system, tokenizer)


def _render_chat(messages: list[dict], system: str | None, tokenizer) -> list[tuple[str, bool]]:
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("the conversation has no assistant turn to train on")
    if messages[-1]["role"] != "assistant":
        raise RecordError(f"the conversation ends with a '{messages[-1]['role']}' turn; it must end with 'assistant'")
    if getattr(tokenizer, "chat_template", None):
        if system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}] + messages
        return template_segments(tokenizer, messages)
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    try:
        return chat_segments([(m["role"], m["content"]) for m in messages],
                             CHAT_SYSTEM if system is None else system)
    except ValueError as err:  # a misplaced system turn, or turns out of order
        raise RecordError(str(err)) from None


def _text(record: dict, field: str) -> str:
    value = record.get(field)
    if not isinstance(value, str):
        raise RecordError(f"field '{field}' is {type(value).__name__}, expected str")
    return value


def _messages(record: dict, field: str, role_key: str, content_key: str, roles: dict) -> list[dict]:
    turns = record.get(field)
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"field '{field}' is {type(turns).__name__ if not turns else 'empty'}, "
                          f"expected a non-empty list of {{{role_key}, {content_key}}}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(content_key), str):
            raise RecordError(f"{field}[{i}] is {turn!r:.80}, expected {{{role_key}, {content_key}: str}}")
        role = roles.get(turn.get(role_key))
        if role is None:
            raise RecordError(f"{field}[{i}] has {role_key} '{turn.get(role_key)}'; accepted: {list(roles)}")
        messages.append({"role": role, "content": turn[content_key]})
    return messages
