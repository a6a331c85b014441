"""The OpenAI request and response formats: validated sampling options (GenOptions), request errors in OpenAI's error
format, prompts and chat messages, completion bodies. No model, no threads."""

from __future__ import annotations

from dataclasses import dataclass


class RequestError(Exception):
    """An HTTP error answered in OpenAI's error format; `param` names the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass(frozen=True)
class GenOptions:
    """Sampling options of one request; requests with equal `batch_key()` can share a generate call."""

    max_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # 1.0: off
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1.0: off
    stop: tuple[str, ...] = ()
    seed: int | None = None  # sampling with a seed runs alone, so the seed alone decides its tokens

    def batch_key(self) -> tuple | None:
        """None: runs alone (sampling with a seed: its tokens must not depend on other rows drawing first)."""
        if self.temperature == 0:  # greedy: only the penalty changes the tokens
            return ("greedy", self.repetition_penalty)
        if self.seed is not None:
            return None
        return ("sample", self.temperature, self.top_p, self.top_k, self.repetition_penalty)


_SAMPLING_FIELDS = {"max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed", "n",
                    "stream", "stream_options", "user", "model", "presence_penalty", "frequency_penalty",
                    "logit_bias", "logprobs"}
COMPLETION_FIELDS = _SAMPLING_FIELDS | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = _SAMPLING_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}


def _number(body, name, default, low, high, low_open=False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (low < v if low_open else low <= v) or v > high:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise RequestError(400, f"'{name}' must be a number in {interval}, got {v!r}", name)
    return float(v)


def _integer(body, name, default, low):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise RequestError(400, f"'{name}' must be an integer >= {low}, got {v!r}", name)
    return v


def _unsupported(body, name, off_values, what):
    if name in body and body[name] not in off_values:
        raise RequestError(400, f"'{name}' = {body[name]!r} is not supported ({what})", name)


def parse_options(body: dict, fields: set, default_max_tokens: int) -> tuple[GenOptions, bool, bool]:
    """Validated GenOptions, stream flag and include_usage flag of a request body."""
    unknown = sorted(set(body) - fields)
    if unknown:
        raise RequestError(400, f"unrecognized request field(s) {unknown}; accepted: {sorted(fields)}", unknown[0])
    max_tokens = _integer(body, "max_tokens", None, 1)
    if "max_completion_tokens" in fields and max_tokens is None:
        max_tokens = _integer(body, "max_completion_tokens", None, 1)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                             or not all(isinstance(s, str) and s for s in stop)):
        raise RequestError(400, f"'stop' must be a non-empty string or a list of at most 4 non-empty strings, "
                                f"got {body.get('stop')!r}", "stop")
    top_k = _integer(body, "top_k", 0, -1)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, f"'seed' must be an integer, got {seed!r}", "seed")
    _unsupported(body, "n", (None, 1), "only n = 1 is served")
    _unsupported(body, "best_of", (None, 1), "only best_of = 1 is served")
    _unsupported(body, "echo", (None, False), "echo is not served")
    _unsupported(body, "suffix", (None,), "suffix is not served")
    _unsupported(body, "logprobs", (None, False, 0), "log-probabilities are not served")
    _unsupported(body, "top_logprobs", (None, 0), "log-probabilities are not served")
    _unsupported(body, "logit_bias", (None, {}), "logit_bias is not served")
    for name in ("presence_penalty", "frequency_penalty"):
        _unsupported(body, name, (None, 0, 0.0), "use repetition_penalty")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, f"'stream' must be true or false, got {stream!r}", "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict) or not isinstance(stream_options.get("include_usage", False), bool):
        raise RequestError(400, f"'stream_options' must be an object like {{\"include_usage\": true}}, got "
                                f"{body.get('stream_options')!r}", "stream_options")
    options = GenOptions(
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=max(top_k, 0),  # -1 (vLLM's "off") and 0 are both off
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, low_open=True),
        stop=tuple(stop or ()),
        seed=seed,
    )
    return options, stream, stream_options.get("include_usage", False)


def parse_prompts(body: dict) -> list[str]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt
    raise RequestError(400, f"'prompt' must be a string or a non-empty list of strings, got {prompt!r}"[:300],
                       "prompt")


def parse_messages(body: dict) -> list[dict]:
    """[{"role", "content"}] with text content; the last turn must be the user's."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, f"'messages' must be a non-empty list of {{role, content}} objects, got "
                                f"{messages!r}"[:300], "messages")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise RequestError(400, f"'messages[{i}].role' must be 'system', 'user' or 'assistant', got {role!r}",
                               f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise RequestError(400, f"'messages[{i}].content' must be a string or a list of text parts, got "
                                    f"{content!r}"[:300], f"messages[{i}].content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    if out[-1]["role"] != "user":
        raise RequestError(400, f"'messages' must end with a user message, the last is {out[-1]['role']!r}",
                           "messages")
    return out


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The tokenizer's own chat_template when it has one, else the OpenMoE-8B-Chat template (system messages joined;
    the default system prompt when there is none)."""
    from openmoe import inference

    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or inference.CHAT_SYSTEM
    return inference.chat_prompt([(m["role"], m["content"]) for m in messages if m["role"] != "system"], system)


def usage(seqs) -> dict:
    prompt, completion = sum(s.prompt_tokens for s in seqs), sum(len(s.tokens) for s in seqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def response_body(seqs, meta, chat) -> dict:
    if chat:
        choices = [{"index": s.index, "message": {"role": "assistant", "content": s.text}, "logprobs": None,
                    "finish_reason": s.finish_reason} for s in seqs]
        return {**meta, "object": "chat.completion", "choices": choices, "usage": usage(seqs)}
    choices = [{"index": s.index, "text": s.text, "logprobs": None, "finish_reason": s.finish_reason} for s in seqs]
    return {**meta, "object": "text_completion", "choices": choices, "usage": usage(seqs)}
