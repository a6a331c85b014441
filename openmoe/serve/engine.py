"""Generation engines: the model adapter (generate_batch), per-prompt state (Sequence), static batching (Engine),
continuous batching (ContinuousEngine) and the expert-parallel row split (SplitRows, follow). Threads and tensors,
no HTTP."""

from __future__ import annotations

import queue
import random
import threading
import time
from dataclasses import dataclass, field, replace

import torch

from openmoe.serve.api import GenOptions, RequestError

# ----------------------------------------------------------------------------------------------- model adapter


def generate_batch(model, tokenizer, prompts: list[str], options: GenOptions, on_step=None, stop_now=None,
                   decoder=None, rows: list[int] | None = None) -> list[list[int]]:
    """The model's one entry point: prompts -> new token ids per row (EOS and padding removed).

    on_step(tokens: list[int], finished: list[bool]) after every decode step; stop_now(local_done) -> bool is asked
    after every step and ends the call when True (under expert parallelism it must give the same answer on every
    rank, because each step's all-to-all needs all of them). decoder: a fast_decode.FastDecoder over `model` (same
    contract as generation.generate; it reports steps in bursts every sync_every steps), None for the eager
    reference generation.generate (model.generate becomes transformers' with the HF-native model, issue 16).
    rows: decode only these rows of the batch (an expert-parallel rank's share), padded to the whole batch's width."""
    from openmoe import generation, inference

    ids, mask = inference.encode_batch(tokenizer, prompts)  # [B, S] left-padded, <pad>-BOS first
    if rows is not None:
        ids, mask = ids[rows], mask[rows]
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


def encode(tokenizer, text: str) -> list[int]:
    from openmoe import data

    return data.encode(tokenizer, text, add_bos=True, add_eos=False)


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
                generate_batch(self.model, self.tokenizer, prompts, options, rows.keep,
                               lambda local_done: rows.exchange(on_step, lambda: stop_now(False)), rows=rows.local)
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
        first = self.decoder.admit(slot, encode(self.tokenizer, seq.prompt), seq.options.max_tokens)
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
    """Expert parallelism: rank r decodes rows r, r + ep, r + 2 ep, ... of a batch, then copies of row 0 (discarded)
    up to ceil(B / ep) rows, all at the batch's width (inference.rank_rows): every rank must step, as each step's
    all-to-all needs all of them, and with --capacity_routing the all-to-all splits are sized from the local token
    count, which must then be equal on every rank. After every step the
    ranks all-gather their new tokens (one [2, ceil(B / ep)] tensor each), rank 0 updates the sequences and
    broadcasts whether to stop: two small collectives and a host read per step, on the eager path that has them."""

    def __init__(self, batch_size: int, device):
        import torch.distributed as dist

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.batch_size, self.device = batch_size, device
        from openmoe.inference import rank_rows

        self.local, n = rank_rows(batch_size, self.rank, self.world)  # rows decoded here: n real, then dummies
        self.rows = self.local[:n]
        self.width = len(self.local)  # rows per rank
        self.last = ([], [])

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
        generate_batch(model, tokenizer, prompts, options, rows.keep, lambda local: rows.exchange(), rows=rows.local)
