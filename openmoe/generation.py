"""Reference autoregressive decoding with a KV cache. Shapes: B batch, S prompt, V vocabulary.

`model.generate` is transformers' GenerationMixin.generate (greedy, sampling, beams, streamers, stop strings); this
loop is the obviously-correct reference it is tested against, and what the static-cache fast decoder reproduces:
    ids = generate(model, input_ids, attention_mask, max_new_tokens=32)

Prompts may be left-padded (attention_mask 0 on the left): positions count real tokens only, padding keys are
masked, and padding tokens are never routed to experts, so a padded row decodes as it would alone (up to capacity
dropping, which depends on the batch; dropless routing removes that too).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from openmoe.model import bos_visible_mask


def process_logits(logits, generated, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0):
    """logits [B, V] fp32 -> adjusted logits. generated [B, n] ids already in the sequence (for the penalty)."""
    if repetition_penalty != 1.0 and generated.numel():
        prev = logits.gather(1, generated)
        # CTRL / HF convention: shrink positive logits, push negative ones further down
        shrunk = torch.where(prev > 0, prev / repetition_penalty, prev * repetition_penalty)
        logits = logits.scatter(1, generated, shrunk)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def ends_with_any(seqs: torch.Tensor, stops: Sequence[Sequence[int]]) -> torch.Tensor:
    """[B] bool: row's tail equals one of the stop token sequences."""
    hit = torch.zeros(seqs.shape[0], dtype=torch.bool, device=seqs.device)
    for stop in stops:
        n = len(stop)
        if 0 < n <= seqs.shape[1]:
            hit |= (seqs[:, -n:] == torch.tensor(stop, device=seqs.device)).all(dim=1)
    return hit


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,  # [B, S]
    attention_mask: torch.Tensor | None = None,  # [B, S], 0 = left padding
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | None = None,
    stop_sequences: Sequence[Sequence[int]] = (),
    generator: torch.Generator | None = None,
    on_tokens: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    all_done: Callable[[bool], bool] | None = None,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """Returns [B, S + n] ids (n <= max_new_tokens); finished rows are filled with pad after their stop.

    on_tokens(tokens [B], finished [B]) is called after every step (streaming).
    all_done(local_done) lets expert-parallel ranks agree to stop together: every rank must run the same number of
    steps because each step's MoE all-to-all involves all of them. Without it, generation stops when all rows end.
    vocab_limit: ids >= this are never produced (the embedding is padded past the tokenizer: 256384 vs umT5's 256300).
    """
    cfg = model.config
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if cfg.pad_is_bos:  # decoding steps see only the new token: fix the BOS rule's mask once, over the prompt
        attention_mask = bos_visible_mask(input_ids, attention_mask, cfg.bos_token_id)
    seqs, mask = input_ids, attention_mask
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    past, step_ids = None, input_ids
    for _ in range(max_new_tokens):
        h, past, _ = model.model(step_ids, mask, None, past, use_cache=True)
        # [B, V]: only the last position is needed; with a device map the head may sit on another device
        logits = model.lm_head(h[:, -1]).float().to(seqs.device)
        if vocab_limit is not None:
            logits[:, vocab_limit:] = float("-inf")
        if do_sample:
            probs = process_logits(logits, seqs, temperature, top_k, top_p, repetition_penalty).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            nxt = process_logits(logits, seqs, 1.0, 0, 1.0, repetition_penalty).argmax(-1)
        nxt = torch.where(finished, torch.full_like(nxt, cfg.pad_token_id), nxt)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        mask = torch.cat([mask, (~finished).long()[:, None]], dim=1)
        finished = finished | (nxt == eos) | ends_with_any(seqs[:, input_ids.shape[1]:], stop_sequences)
        if on_tokens is not None:
            on_tokens(nxt, finished)
        done = bool(finished.all())
        if (all_done(done) if all_done is not None else done):
            break
        step_ids = nxt[:, None]
    return seqs
