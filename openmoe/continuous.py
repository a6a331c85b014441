"""Continuous batching on the fast decoder's static cache: every one of max_batch_size slots holds one sequence at
its own cache column, sequences join and leave between decode steps. Shapes: B slots (= max_batch_size), S prompt,
M max_seq_len, V vocabulary, n steps between host reads.

    dec = SlotDecoder(model, max_batch_size=8, max_seq_len=2048)
    first = dec.admit(slot, prompt_ids, max_tokens)      # prefill one unpadded prompt into a free slot (one host read)
    tokens = dec.step(n)                                 # n decode steps of every slot, one host read: [B][n] ids
    dec.release(slot)                                    # the slot is free again (its stale cache is masked off)

Unlike FastDecoder.generate (left-padded prompts sharing columns), a slot's prompt starts at column 0 unpadded, so its
positions equal its columns and no padding is ever attended or routed; each step writes every slot's token at that
slot's own column (an index_put with [B] columns: still fixed shapes, one CUDA graph). A slot stops producing on the
device at EOS or when its max_tokens are out (later steps of the window give pad), so a window never writes past
prompt + max_tokens <= M. All slots share one set of sampling options (set by `configure`); the serving engine admits
only sequences with the running options. The reference is generation.generate on each prompt alone
(tests/unit/test_continuous.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from openmoe.fast_decode import FastDecoder, decode_bias
from openmoe.model import repeat_kv, rope_cos_sin


class SlotDecoder(FastDecoder):
    def __init__(self, model, max_batch_size: int, max_seq_len: int, moe_impl: str = "auto", compile: bool = False,
                 vocab_limit: int | None = None):
        super().__init__(model, max_batch_size, max_seq_len, moe_impl, compile=False)
        b, dev = max_batch_size, self.device
        self.vocab_limit = vocab_limit
        self.key_mask = torch.zeros(b, max_seq_len, dtype=torch.bool, device=dev)  # [B, M] cached real tokens
        self.cols = torch.zeros(b, dtype=torch.long, device=dev)  # [B] column (= position) of the next input token
        self.tokens = torch.zeros(b, dtype=torch.long, device=dev)  # [B] next input token (last one sampled)
        self.remaining = torch.zeros(b, dtype=torch.long, device=dev)  # [B] tokens a slot may still produce
        self.presence = torch.zeros(b, self.config.vocab_size, dtype=torch.bool, device=dev)  # repetition penalty
        self.configure()
        self._rows_step = self._decode_rows
        if compile:
            self._rows_step = torch.compile(self._decode_rows, mode="reduce-overhead", fullgraph=True, dynamic=False)
        self._compiled_rows = compile

    def configure(self, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  repetition_penalty: float = 1.0, generator: torch.Generator | None = None) -> None:
        """Sampling options of every slot (change them only while no slot is busy)."""
        self.sampling = (do_sample, temperature, top_k, top_p, repetition_penalty, generator)

    # ---- the cache, per slot
    def _attention(self, i, attn, x, cos, sin, allowed, where, prefill: bool):
        """where = (slots: slice of cache rows, rows [R, 1], cols [R, S]): this call's K/V go to cache cells
        (rows, cols) of those slots; attention runs over all M columns of them. A tensor `where` is
        FastDecoder.generate's shared columns (its static path still works on this cache while no slot is busy)."""
        if isinstance(where, torch.Tensor):
            return super()._attention(i, attn, x, cos, sin, allowed, where, prefill)
        slots, rows, cols = where
        q, k, v = self._qkv(i, attn, x, cos, sin)  # [B, N, S, D], [B, N_kv, S, D] x 2
        b, s, _ = x.shape
        k_cache, v_cache = self.k_cache[i][slots], self.v_cache[i][slots]  # [B, N_kv, M, D] views
        k_cache[rows, :, cols] = k.transpose(1, 2)  # [B, S, N_kv, D] into per-row columns
        v_cache[rows, :, cols] = v.transpose(1, 2)
        n_rep = attn.num_heads // attn.num_kv_heads
        out = F.scaled_dot_product_attention(q, repeat_kv(k_cache, n_rep), repeat_kv(v_cache, n_rep),
                                             attn_mask=allowed, scale=attn.scale)  # [B, N, S, D]
        return self._linear(attn.o_proj, out.transpose(1, 2).reshape(b, s, -1))

    def _decode_rows(self, tokens, cols, key_mask):
        """tokens, cols [B], key_mask [B, M] -> logits [B, V]: every slot's token at its own column and position."""
        cfg, b = self.config, tokens.shape[0]
        h = self.model.model.embed_tokens(tokens[:, None])  # [B, 1, H]
        cos, sin = rope_cos_sin(cols[:, None], cfg.head_dim, cfg.rope_theta, h.dtype)  # positions = columns
        columns = torch.arange(self.max_seq_len, device=tokens.device)
        allowed = decode_bias(key_mask | (columns == cols[:, None]), h.dtype)  # [B, 1, 1, M]
        where = (slice(None), torch.arange(b, device=tokens.device)[:, None], cols[:, None])
        for i, layer in enumerate(self.model.model.layers):
            h = self._layer(i, layer, h, cos, sin, allowed, where, None, prefill=False)
        return self._logits(h)

    # ---- slots
    @torch.no_grad()
    def admit(self, slot: int, prompt_ids: list[int], max_tokens: int) -> int:
        """Prefill `prompt_ids` (BOS included, no padding) into `slot`; returns the first new token (a host read)."""
        s = len(prompt_ids)
        self.check_request(1, s, max_tokens)
        dev, cfg = self.device, self.config
        ids = torch.tensor([prompt_ids], device=dev)  # [1, S]
        columns = torch.arange(s, device=dev)
        allowed = torch.zeros(1, 1, s, self.max_seq_len, dtype=torch.bool, device=dev)
        allowed[..., :s] = columns[None, :] <= columns[:, None]  # causal over the prompt  [1, 1, S, M]
        h = self.model.model.embed_tokens(ids)
        cos, sin = rope_cos_sin(columns[None], cfg.head_dim, cfg.rope_theta, h.dtype)
        where = (slice(slot, slot + 1), torch.zeros(1, 1, dtype=torch.long, device=dev), columns[None])
        for i, layer in enumerate(self.model.model.layers):
            h = self._layer(i, layer, h, cos, sin, allowed, where, torch.ones(1, s, dtype=torch.bool, device=dev),
                            prefill=True)
        self.key_mask[slot] = False
        self.key_mask[slot, :s] = True
        self.presence[slot] = False
        self.presence[slot, ids[0]] = True
        first = self._sample(self._logits(h), self.presence[slot:slot + 1])  # [1]
        self.presence[slot, first] = True
        self.cols[slot], self.tokens[slot] = s, first[0]
        self.remaining[slot] = max_tokens - 1
        self.remaining[slot] *= (first[0] != cfg.eos_token_id).long()
        return int(first[0])

    def release(self, slot: int) -> None:
        self.key_mask[slot] = False
        self.cols[slot] = self.tokens[slot] = self.remaining[slot] = 0

    @torch.no_grad()
    def step(self, n: int) -> list[list[int]]:
        """n decode steps of every slot (idle ones compute and are ignored); one host read: tokens [B][n], pad after a
        slot stopped (EOS or max_tokens)."""
        out = torch.empty(self.max_batch_size, n, dtype=torch.long, device=self.device)
        rows = torch.arange(self.max_batch_size, device=self.device)
        for j in range(n):
            active = self.remaining > 0  # [B]
            if self._compiled_rows:
                torch.compiler.cudagraph_mark_step_begin()
            logits = self._rows_step(self.tokens, self.cols, self.key_mask)
            if self._compiled_rows:
                logits = logits.clone()  # the graph's output buffer is reused by the next replay
            self.key_mask[rows, self.cols] |= active  # the token just cached is real for active slots
            self.cols += active.long()
            nxt = torch.where(active, self._sample(logits, self.presence), self.config.pad_token_id)
            self.presence[rows, nxt] |= active
            self.remaining -= active.long()
            self.remaining *= (nxt != self.config.eos_token_id).long()
            self.tokens = torch.where(active, nxt, self.tokens)
            out[:, j] = nxt
        return out.tolist()

    def _sample(self, logits, presence):
        do_sample, temperature, top_k, top_p, penalty, generator = self.sampling
        return self._choose(logits, presence, do_sample, temperature, top_k, top_p, penalty, generator,
                            self.vocab_limit)
