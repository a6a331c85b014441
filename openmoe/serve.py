"""OpenAI-compatible HTTP server for OpenMoE checkpoints (standard library HTTP, no web framework).

    python -m openmoe.serve --model outputs/tiny-ep/hf --port 8000
    torchrun --nproc_per_node 2 -m openmoe.serve --model /ckpt/openmoe-8b --ep_size 2   # experts sharded, rank 0 serves

Endpoints: POST /v1/completions, POST /v1/chat/completions (the tokenizer's chat_template, else the OpenMoE-8B-Chat
template), both with `"stream": true` as server-sent events; GET /v1/models; GET /health.
Request fields: max_tokens, temperature (0 = greedy; OpenAI's default 1.0 samples), top_p, top_k, repetition_penalty,
stop (up to 4 strings), seed, stream, stream_options.include_usage; n = 1 only. A bad field gets a 400 whose message
names it; a full queue a 429; a stopped engine a 503.

How a request flows:
  HTTP thread   validates and tokenizes, queues one `Sequence` per prompt (bounded: 429 when full), then waits on
                its events (streaming: writes each text delta as it arrives).
  engine thread (--decode eager / static) takes the oldest waiting sequence plus every other waiting one with the
                same sampling options (up to --max_batch_size, after waiting --batch_window_ms for more), and runs
                them as ONE left-padded call of `generate_batch`; per-step tokens update each sequence (stop strings,
                max_tokens, EOS), and the call ends early once every row is done (or its client went away).
                (--decode continuous) keeps a continuous.SlotDecoder's slots busy instead: a sequence with the running
                options joins at the next host read (every few steps) and leaves when done (ContinuousEngine).
Routing is dropless by default, so a row's tokens do not depend on which requests share its batch (with capacity
routing a busy expert drops tokens depending on the other rows).
Expert parallelism: every rank runs the engine loop's `generate_batch` calls together. Rank 0 broadcasts each batch
(prompts and options); rank r decodes rows r, r + ep, ...; after every step the ranks all-gather the new tokens and
rank 0 broadcasts its stop decision (SplitRows); the other ranks only follow (`follow`).
`generate_batch` and the SlotDecoder (admit / step / release) are the only ways the engine touches the model.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

# ----------------------------------------------------------------------------------------------- model adapter


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


def generate_batch(model, tokenizer, prompts: list[str], options: GenOptions, on_step=None, stop_now=None,
                   decoder=None) -> list[list[int]]:
    """The model's one entry point: prompts -> new token ids per row (EOS and padding removed).

    on_step(tokens: list[int], finished: list[bool]) after every decode step; stop_now(local_done) -> bool is asked
    after every step and ends the call when True (under expert parallelism it must give the same answer on every
    rank, because each step's all-to-all needs all of them). decoder: a fast_decode.FastDecoder over `model` (same
    contract as generation.generate; it reports steps in bursts every sync_every steps), None for the eager
    reference generation.generate (model.generate becomes transformers' with the HF-native model, issue 16)."""
    from openmoe import generation, inference

    ids, mask = inference.encode_batch(tokenizer, prompts)  # [B, S] left-padded, <pad>-BOS first
    device = next(model.parameters()).device
    seed = options.seed if options.seed is not None else 0
    generator = torch.Generator(device=device).manual_seed(seed)
    step = None if on_step is None else (lambda t, f: on_step(t.tolist(), f.tolist()))  # a host read per step
    generate = (lambda *a, **k: generation.generate(model, *a, **k)) if decoder is None else decoder.generate
    out = generate(ids.to(device), mask.to(device), max_new_tokens=options.max_tokens,
                   do_sample=options.temperature > 0, temperature=options.temperature or 1.0,
                   top_k=options.top_k, top_p=options.top_p, repetition_penalty=options.repetition_penalty,
                   generator=generator, on_tokens=step, all_done=stop_now, vocab_limit=len(tokenizer))
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        row = row[: row.index(eos)] if eos in row else row
        rows.append([t for t in row if t != pad])
    return rows


# ------------------------------------------------------------------------------------------- requests and rows


class RequestError(Exception):
    """An HTTP error answered in OpenAI's error format; `param` names the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass
class Sequence:
    """One prompt of a request: its tokens so far and the text already sent to the client."""

    prompt: str
    prompt_tokens: int
    options: GenOptions
    index: int  # choice index within the request
    events: queue.Queue  # shared by the request's sequences: ("delta", index, text) / ("done", index) / ("error", ..)
    cancelled: threading.Event  # the client went away
    tokenizer: object = field(repr=False, default=None)
    tokens: list = field(default_factory=list)
    text: str = ""  # decoded completion, cut at a stop string
    sent: str = ""  # prefix of `text` already sent as deltas
    finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled.is_set()

    def on_token(self, token: int, finished: bool, eos: int) -> None:
        if self.finish_reason is not None:
            return
        if finished and token == eos:
            return self.finish("stop")
        self.tokens.append(token)
        text = _decode(self.tokenizer, self.tokens)
        cut = min((i for i in (text.find(s) for s in self.options.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = text[:cut]
            return self.finish("stop")
        self.text = text
        if len(self.tokens) >= self.options.max_tokens:
            return self.finish("length")
        self._send(_streamable(text, self.options.stop))

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        self._send(self.text)
        self.events.put(("done", self.index))

    def _send(self, upto: str) -> None:
        """Send what `upto` adds to the text already sent (nothing if decoding rewrote earlier text)."""
        if upto.startswith(self.sent) and len(upto) > len(self.sent):
            self.events.put(("delta", self.index, upto[len(self.sent):]))
            self.sent = upto


def _decode(tokenizer, tokens: list[int]) -> str:
    from openmoe import data

    return data.decode(tokenizer, tokens).lstrip()  # as infer.py: no leading space before the answer


def _streamable(text: str, stops: tuple[str, ...]) -> str:
    """The part of `text` that is final: without an incomplete UTF-8 character (sentencepiece byte fallback decodes
    it as U+FFFD) and without a tail that may be the start of a stop string."""
    text = text.rstrip("\ufffd")
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return text[: len(text) - hold]


# ------------------------------------------------------------------------------------------------------ engine


class Engine:
    """Bounded waiting list + one thread that batches compatible sequences into generate_batch calls."""

    def __init__(self, model, tokenizer, max_batch_size: int = 8, max_queue: int = 64, batch_window_s: float = 0.01,
                 distributed: bool = False, decoder=None):
        self.model, self.tokenizer, self.decoder = model, tokenizer, decoder
        self.max_batch_size, self.max_queue, self.batch_window_s = max_batch_size, max_queue, batch_window_s
        self.distributed = distributed  # rank 0 of an expert-parallel group: broadcast every batch and stop flag
        self.eos = model.config.eos_token_id
        self._waiting: list[Sequence] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="openmoe-engine", daemon=True)
        self.batches: list[int] = []  # size of every batch run (for logs and tests)

    def start(self) -> "Engine":
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, seqs: list[Sequence]) -> None:
        with self._cond:
            if not self.alive:
                raise RequestError(503, "the generation engine is not running", kind="server_error")
            if len(self._waiting) + len(seqs) > self.max_queue:
                raise RequestError(429, f"the server is busy: {len(self._waiting)} sequences are waiting and this "
                                        f"request adds {len(seqs)} (queue limit {self.max_queue}); retry later",
                                   kind="rate_limit_error")
            self._waiting.extend(seqs)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        with self._cond:  # nobody will run these: answer them rather than leave their clients waiting
            for seq in self._waiting:
                _fail(seq, 503, "the server is stopping")
            self._waiting = []

    def _next_batch(self) -> list[Sequence] | None:
        with self._cond:
            while not self._waiting and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
        time.sleep(self.batch_window_s)  # let concurrent requests arrive and join this batch
        with self._cond:
            self._waiting = [s for s in self._waiting if not s.cancelled.is_set()]
            if not self._waiting:
                return []
            key = self._waiting[0].options.batch_key()
            batch = self._waiting[:1] if key is None else [
                s for s in self._waiting if s.options.batch_key() == key][: self.max_batch_size]
            taken = set(map(id, batch))
            self._waiting = [s for s in self._waiting if id(s) not in taken]
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self._run(batch)
        if self.distributed:
            _broadcast_object(None)  # tells the following ranks to return

    def _run(self, batch: list[Sequence]) -> None:
        self.batches.append(len(batch))
        options = replace(batch[0].options, max_tokens=max(s.options.max_tokens for s in batch), stop=())
        if options.temperature > 0 and options.seed is None:
            options = replace(options, seed=random.randrange(2**63))  # the same on every rank once broadcast
        prompts = [s.prompt for s in batch]

        def on_step(tokens, finished):
            for s, t, f in zip(batch, tokens, finished):
                s.on_token(t, f, self.eos)

        def stop_now(local_done: bool) -> bool:
            return local_done or all(s.done for s in batch)

        try:
            if self.distributed:
                _broadcast_object((prompts, options))
                rows = SplitRows(len(prompts), self._device())
                generate_batch(self.model, self.tokenizer, rows.local(prompts), options, rows.keep,
                               lambda local_done: rows.exchange(on_step, lambda: stop_now(False)))
            else:
                generate_batch(self.model, self.tokenizer, prompts, options, on_step, stop_now, self.decoder)
            for s in batch:
                if s.finish_reason is None:
                    s.finish("length")
        except Exception as e:  # answer the batch, keep serving
            for s in batch:
                _fail(s, 500, f"generation failed: {type(e).__name__}: {e}")

    def _device(self):
        return next(self.model.parameters()).device


class ContinuousEngine(Engine):
    """Continuous batching over a continuous.SlotDecoder: a waiting sequence with the running sampling options takes
    a free slot at the next host read (every `sync_every` decode steps) and gives it back when done, so a short
    request does not wait for a long one. Sampling with a seed runs alone through the decoder's static path (the same
    tokens as generation.generate with that seed), once no slot is busy. One device, no expert parallelism."""

    def __init__(self, model, tokenizer, decoder, max_queue: int = 64, batch_window_s: float = 0.01,
                 sync_every: int = 4):
        super().__init__(model, tokenizer, decoder.max_batch_size, max_queue, batch_window_s, False, decoder)
        self.sync_every = sync_every
        self.active: dict[int, Sequence] = {}  # slot -> its sequence
        self.running_key = None  # batch_key of the sequences in the slots
        self.admissions: list[int] = []  # busy slots at each admission (logs and tests)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self.active and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    break
            if not self.active:
                time.sleep(self.batch_window_s)  # an idle engine lets concurrent requests arrive together
            with self._cond:
                alone, admit = self._take()
            try:
                if alone is not None:
                    self._run([alone])
                    continue
                for slot, seq in admit:
                    self._admit(slot, seq)
                if self.active:
                    self._decode()
            except Exception as e:  # answer the sequences in flight, keep serving
                for slot, seq in list(self.active.items()) + admit:
                    _fail(seq, 500, f"generation failed: {type(e).__name__}: {e}")
                    self.decoder.release(slot)
                self.active.clear()
        for slot, seq in self.active.items():
            _fail(seq, 503, "the server is stopping")

    def _take(self) -> tuple[Sequence | None, list[tuple[int, Sequence]]]:
        """(a sequence to run alone, or None; [(free slot, sequence)] to admit). Called under the lock."""
        self._waiting = [s for s in self._waiting if not s.cancelled.is_set()]
        if not self._waiting:
            return None, []
        if not self.active:
            first = self._waiting[0]
            if first.options.batch_key() is None:
                return self._waiting.pop(0), []
            self.running_key = first.options.batch_key()
            o = first.options
            generator = torch.Generator(device=self.decoder.device).manual_seed(random.randrange(2**63))
            self.decoder.configure(o.temperature > 0, o.temperature or 1.0, o.top_k, o.top_p, o.repetition_penalty,
                                   generator)
        free = [i for i in range(self.decoder.max_batch_size) if i not in self.active]
        take = [s for s in self._waiting if s.options.batch_key() == self.running_key][: len(free)]
        taken = set(map(id, take))
        self._waiting = [s for s in self._waiting if id(s) not in taken]
        return None, list(zip(free, take))

    def _admit(self, slot: int, seq: Sequence) -> None:
        self.admissions.append(len(self.active))
        first = self.decoder.admit(slot, _encode(self.tokenizer, seq.prompt), seq.options.max_tokens)
        seq.on_token(first, first == self.eos, self.eos)
        if seq.done:
            self.decoder.release(slot)
        else:
            self.active[slot] = seq

    def _decode(self) -> None:
        tokens = self.decoder.step(self.sync_every)  # [B][n]: the one host read of these steps
        for slot, seq in list(self.active.items()):
            for t in tokens[slot]:
                seq.on_token(t, t == self.eos, self.eos)
                if seq.done:
                    break
            if seq.done:  # finished, stopped by a stop string, or its client went away
                self.decoder.release(slot)
                del self.active[slot]



def _fail(seq: Sequence, status: int, message: str) -> None:
    """End a sequence with an HTTP error for its client (unless it already finished)."""
    if seq.finish_reason is None:
        seq.finish_reason = "error"
        seq.events.put(("error", status, message))


def _broadcast_object(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _broadcast_flag(flag: bool, device) -> bool:
    """Rank 0's decision to every rank (one small broadcast per decode step under expert parallelism)."""
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


class SplitRows:
    """Expert parallelism: rank r decodes rows r, r + ep, r + 2 ep, ... of a batch (a rank without rows decodes a copy
    of row 0 and discards it: every rank must step, each step's all-to-all needs all of them). After every step the
    ranks all-gather their new tokens (one [2, ceil(B / ep)] tensor each), rank 0 updates the sequences and
    broadcasts whether to stop: two small collectives and a host read per step, on the eager path that has them."""

    def __init__(self, batch_size: int, device):
        import torch.distributed as dist

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.batch_size, self.device = batch_size, device
        self.rows = list(range(self.rank, batch_size, self.world))
        self.width = -(-batch_size // self.world)  # rows per rank, the last ranks padded
        self.last = ([], [])

    def local(self, prompts: list[str]) -> list[str]:
        return [prompts[i] for i in self.rows] or prompts[:1]

    def keep(self, tokens: list[int], finished: list[bool]) -> None:
        self.last = (tokens, finished)  # this rank's rows of the step; exchanged when generate asks to stop

    def exchange(self, on_step=None, stop=None) -> bool:
        """All ranks: gather the step's tokens; rank 0 runs on_step over the whole batch and decides with stop()."""
        import torch.distributed as dist

        n = len(self.rows)
        mine = torch.full((2, self.width), -1, dtype=torch.long, device=self.device)  # [tokens; finished]
        mine[0, :n] = torch.tensor(self.last[0][:n], dtype=torch.long)
        mine[1, :n] = torch.tensor(self.last[1][:n], dtype=torch.long)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine)
        decision = False
        if self.rank == 0:
            parts = [p.tolist() for p in parts]
            rows = [(parts[i % self.world][0][i // self.world], parts[i % self.world][1][i // self.world])
                    for i in range(self.batch_size)]  # batch row i lives on rank i % ep, at i // ep
            on_step([t for t, _ in rows], [bool(f) for _, f in rows])
            decision = stop()
        return _broadcast_flag(decision, self.device)


def follow(model, tokenizer) -> None:
    """Ranks other than 0: run their rows of every batch rank 0 broadcasts, until it sends None."""
    device = next(model.parameters()).device
    while (msg := _broadcast_object(None)) is not None:
        prompts, options = msg
        rows = SplitRows(len(prompts), device)
        generate_batch(model, tokenizer, rows.local(prompts), options, rows.keep, lambda local: rows.exchange())


# ------------------------------------------------------------------------------------------ request validation

DECODE_MODES = ("eager", "static", "continuous")
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


# -------------------------------------------------------------------------------------------------------- HTTP


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, engine: Engine, model_name: str, max_model_len: int, default_max_tokens: int,
                 verbose: bool = False):
        super().__init__(address, Handler)
        self.engine, self.model_name, self.max_model_len = engine, model_name, max_model_len
        self.default_max_tokens, self.verbose = default_max_tokens, verbose
        self.created = int(time.time())

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):  # a client hanging up is normal
            super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, fmt, *args):
        if self.server.verbose:
            super().log_message(fmt, *args)

    # ---- routes
    def do_GET(self):
        if self.path == "/health":
            ok = self.server.engine.alive
            return self._json(200 if ok else 503, {"status": "ok" if ok else "engine stopped"})
        if self.path == "/v1/models":
            return self._json(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": self.server.created,
                 "owned_by": "openmoe"}]})
        self._error(RequestError(404, f"no route GET {self.path}; GET /health, /v1/models", kind="not_found_error"))

    def do_POST(self):
        routes = {"/v1/completions": False, "/v1/chat/completions": True}
        if self.path not in routes:
            body_len = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(body_len)
            return self._error(RequestError(404, f"no route POST {self.path}; POST {sorted(routes)}",
                                            kind="not_found_error"))
        try:
            self._generate(self._body(), chat=routes[self.path])
        except RequestError as e:
            self._error(e)
        except Exception as e:  # a bug of ours: answer it rather than drop the connection
            self._error(RequestError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error"))

    # ---- generation
    def _generate(self, body: dict, chat: bool):
        srv = self.server
        name = body.get("model")
        if name is not None and name != srv.model_name:
            raise RequestError(404, f"model {name!r} is not served here; served: {srv.model_name!r}", "model",
                               "not_found_error")
        options, stream, include_usage = parse_options(body, CHAT_FIELDS if chat else COMPLETION_FIELDS,
                                                       srv.default_max_tokens)
        tok = srv.engine.tokenizer
        prompts = [render_chat(tok, parse_messages(body))] if chat else parse_prompts(body)
        if chat:
            options = replace(options, stop=options.stop + ("</s>",))  # the chat model's spelled-out EOS
        events, cancelled = queue.Queue(), threading.Event()
        seqs = []
        for i, p in enumerate(prompts):
            n = len(_encode(tok, p))
            if n + options.max_tokens > srv.max_model_len:
                field_name = "messages" if chat else "prompt"
                raise RequestError(400, f"'max_tokens' ({options.max_tokens}) + the {field_name} ({n} tokens) = "
                                        f"{n + options.max_tokens} exceeds the model's context ({srv.max_model_len}"
                                        " tokens); lower max_tokens or shorten the prompt", "max_tokens")
            seqs.append(Sequence(p, n, options, i, events, cancelled, tok))
        srv.engine.submit(seqs)
        meta = dict(id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", created=int(time.time()),
                    model=srv.model_name)
        try:
            if stream:
                self._stream(seqs, events, meta, chat, include_usage)
            else:
                self._wait(seqs, events)
                self._json(200, _response(seqs, meta, chat))
        except (BrokenPipeError, ConnectionResetError):
            cancelled.set()  # the engine drops these rows at the next step

    def _wait(self, seqs, events):
        left = len(seqs)
        while left:
            ev = events.get()
            if ev[0] == "error":
                raise RequestError(ev[1], ev[2], kind="server_error")
            left -= ev[0] == "done"

    def _stream(self, seqs, events, meta, chat, include_usage):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index, text=None, finish=None, role=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {**meta, "object": obj, "choices": [choice]}

        if chat:
            self._event(chunk(0, role=True))
        left = len(seqs)
        while left:
            ev = events.get()
            if ev[0] == "error":
                self._event({"error": RequestError(ev[1], ev[2], kind="server_error").body()["error"]})
                break
            if ev[0] == "delta":
                self._event(chunk(ev[1], ev[2]))
            else:
                left -= 1
                self._event(chunk(ev[1], finish=seqs[ev[1]].finish_reason))
        if include_usage:
            self._event({**meta, "object": obj, "choices": [], "usage": _usage(seqs)})
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")

    # ---- wire format
    def _body(self) -> dict:
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise RequestError(400, f"Content-Length {self.headers.get('Content-Length')!r} is not a number")
        raw = self.rfile.read(n)
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the request body is not valid JSON: {e}")
        if not isinstance(body, dict):
            raise RequestError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        return body

    def _json(self, status: int, obj: dict, headers: dict | None = None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: RequestError):
        self._json(e.status, e.body(), {"Retry-After": "1"} if e.status in (429, 503) else None)

    def _event(self, obj: dict):
        self._write_chunk(f"data: {json.dumps(obj)}\n\n".encode())

    def _write_chunk(self, data: bytes):
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def _encode(tokenizer, text: str) -> list[int]:
    from openmoe import data

    return data.encode(tokenizer, text, add_bos=True, add_eos=False)


def _usage(seqs) -> dict:
    prompt, completion = sum(s.prompt_tokens for s in seqs), sum(len(s.tokens) for s in seqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _response(seqs, meta, chat) -> dict:
    if chat:
        choices = [{"index": s.index, "message": {"role": "assistant", "content": s.text}, "logprobs": None,
                    "finish_reason": s.finish_reason} for s in seqs]
        return {**meta, "object": "chat.completion", "choices": choices, "usage": _usage(seqs)}
    choices = [{"index": s.index, "text": s.text, "logprobs": None, "finish_reason": s.finish_reason} for s in seqs]
    return {**meta, "object": "text_completion", "choices": choices, "usage": _usage(seqs)}


# ------------------------------------------------------------------------------------------------------ launch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="OpenAI-compatible server for an OpenMoE checkpoint")
    p.add_argument("--model", required=True, help="HF-format checkpoint directory (or a preset name, random weights)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the checkpoint directory)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (the chosen one is printed)")
    p.add_argument("--served_model_name", default=None, help="the id clients pass as 'model' (default: the "
                                                              "checkpoint directory's name)")
    p.add_argument("--dtype", default=None, help="bf16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--ep_size", type=int, default=1, help="expert-parallel ranks (launch with colossalai run)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="max_tokens of a request that gives none")
    p.add_argument("--max_model_len", type=int, default=None,
                   help="prompt + max_tokens limit (default: the config's max_position_embeddings)")
    p.add_argument("--max_batch_size", type=int, default=8, help="sequences per generate call")
    p.add_argument("--max_queue", type=int, default=64, help="waiting sequences before requests get 429")
    p.add_argument("--batch_window_ms", type=float, default=10.0,
                   help="how long the engine waits for more requests before starting a batch")
    p.add_argument("--capacity_routing", action="store_true",
                   help="keep the checkpoint's eval capacity factor (tokens may be dropped, and a row's output then "
                        "depends on the other rows of its batch); default: dropless routing")
    p.add_argument("--decode", default="auto", choices=["auto", *DECODE_MODES],
                   help="eager: static batches through generation.generate (the reference); static: static batches "
                        "through openmoe/fast_decode.py (static KV cache, no host sync per token); continuous: "
                        "sequences join and leave the running batch (openmoe/continuous.py); auto: continuous with "
                        "--compile on one GPU, eager otherwise (CPU, --ep_size > 1, --capacity_routing)")
    p.add_argument("--compile", action="store_true", help="torch.compile(mode='reduce-overhead') the decode step of "
                                                          "--decode static/continuous (CUDA graphs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights of a preset --model")
    p.add_argument("--verbose", action="store_true", help="log every HTTP request")
    return p


def _check_args(a) -> None:
    for name in ("max_new_tokens", "max_batch_size", "max_queue", "ep_size"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name} ({getattr(a, name)}) must be >= 1")
    if not 0 <= a.port <= 65535:
        raise ValueError(f"--port ({a.port}) must be in [0, 65535]")
    if a.decode in ("static", "continuous") and a.capacity_routing:
        raise ValueError(f"--decode {a.decode} routes dropless (no data-dependent shapes); --capacity_routing needs "
                         "--decode eager")
    if a.decode in ("static", "continuous") and a.ep_size > 1:
        raise ValueError(f"--decode {a.decode} runs on one device; with --ep_size {a.ep_size} use --decode eager")
    if a.batch_window_ms < 0:
        raise ValueError(f"--batch_window_ms ({a.batch_window_ms}) must be >= 0")


def load(a):
    """(model, tokenizer, rank) on this process's device; experts sharded over ranks when --ep_size > 1."""
    from openmoe import data, inference
    from openmoe.config import ModelOptions

    cuda = torch.cuda.is_available()
    dtype = inference.check_dtype(a.dtype or ("bf16" if cuda else "fp32"))
    rank = 0
    if a.ep_size > 1:
        import torch.distributed as dist

        if "WORLD_SIZE" not in os.environ:
            raise ValueError(f"--ep_size {a.ep_size} needs a distributed launch: "
                             f"torchrun --nproc_per_node {a.ep_size} -m openmoe.serve ...")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
        rank = dist.get_rank()
        if dist.get_world_size() != a.ep_size:
            raise ValueError(f"--ep_size ({a.ep_size}) must equal the number of launched processes "
                             f"({dist.get_world_size()})")
    tokenizer_path = a.tokenizer or a.model
    if not os.path.isdir(tokenizer_path) and not os.path.isfile(tokenizer_path):
        raise ValueError(f"--model {a.model} is not a directory holding a tokenizer: pass --tokenizer PATH")
    tokenizer = data.load_tokenizer(tokenizer_path)
    options = None if a.capacity_routing else ModelOptions(dropless=True)
    model = inference.load_model(a.model, dtype, a.seed, options=options)
    data.check_vocab(tokenizer, model.config.vocab_size)
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")
    if a.ep_size > 1:
        import torch.distributed as dist

        inference.shard_experts(model, dist.group.WORLD)
    return model.to(device), tokenizer, rank


def start(model, tokenizer, host="127.0.0.1", port=0, model_name="openmoe", max_model_len=None,
          default_max_tokens=64, max_batch_size=8, max_queue=64, batch_window_s=0.01, distributed=False,
          verbose=False, decode="eager", compile=False) -> Server:
    """Engine + HTTP server, serving from a background thread; `stop(server)` ends both.
    decode: "eager" (static batches through generation.generate), "static" (static batches through
    fast_decode.FastDecoder), "continuous" (continuous.SlotDecoder); compile: CUDA graphs for the latter two."""
    max_model_len = max_model_len or model.config.max_position_embeddings
    if decode not in DECODE_MODES:
        raise ValueError(f"decode '{decode}' is not supported; accepted: {list(DECODE_MODES)}")
    if decode == "continuous":
        from openmoe.continuous import SlotDecoder

        slots = SlotDecoder(model, max_batch_size, max_model_len, compile=compile, vocab_limit=len(tokenizer))
        engine = ContinuousEngine(model, tokenizer, slots, max_queue, batch_window_s)
    else:
        decoder = None
        if decode == "static":
            from openmoe.fast_decode import FastDecoder

            decoder = FastDecoder(model, max_batch_size, max_model_len, compile=compile)
        engine = Engine(model, tokenizer, max_batch_size, max_queue, batch_window_s, distributed, decoder)
    server = Server((host, port), engine, model_name, max_model_len, default_max_tokens,
                    verbose)  # binds the port: fails before the engine thread starts
    engine.start()
    threading.Thread(target=server.serve_forever, name="openmoe-http", daemon=True).start()
    return server


def stop(server: Server) -> None:
    server.shutdown()
    server.server_close()
    server.engine.stop()


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        _check_args(a)
        model, tokenizer, rank = load(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if rank != 0:
        follow(model, tokenizer)
        torch.distributed.destroy_process_group()
        return 0
    name = a.served_model_name or os.path.basename(os.path.normpath(a.model))
    decode, compile = a.decode, a.compile
    if decode == "auto":
        gpu = torch.cuda.is_available() and a.ep_size == 1 and not a.capacity_routing
        decode, compile = ("continuous", True) if gpu else ("eager", False)
    server = start(model, tokenizer, a.host, a.port, name, a.max_model_len, a.max_new_tokens, a.max_batch_size,
                   a.max_queue, a.batch_window_ms / 1000, a.ep_size > 1, a.verbose, decode, compile)
    print(f"serving {name} on {server.url}/v1 (decode {decode}{' compiled' if compile else ''}, max_batch_size {a.max_batch_size}, queue "
          f"{a.max_queue}, pid {os.getpid()})", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())  # a clean stop, which also releases the following ranks
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop(server)
        if a.ep_size > 1:
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
