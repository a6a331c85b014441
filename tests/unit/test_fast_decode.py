"""The static-cache fast decoder (openmoe/fast_decode.py) against its reference, the eager model.generate with
dropless routing: identical greedy tokens over 32 steps for a left-padded batch whose rows stop at different steps,
for each MoE implementation; identical sampled tokens from the same generator; the cache never grows."""

import pytest
import torch

from openmoe import OpenMoeForCausalLM, preset
from openmoe.fast_decode import FastDecoder
from openmoe.generation import generate

STEPS = 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # weights 10x the default init: sharp attention and routing, so a wrong position, mask or expert changes tokens
    # (at the default 0.02 the tiny model's greedy tokens survive an off-by-one RoPE position)
    m = OpenMoeForCausalLM(preset("tiny", initializer_range=0.2)).eval()
    m.apply_options(m.options.replace(dropless=True))  # the reference routes every token, as the fast path does
    return m


def padded_batch():
    """Three prompts of 9, 5 and 2 tokens (BOS <pad> first), left-padded to 9."""
    g = torch.Generator().manual_seed(1)
    lengths = (9, 5, 2)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, -n + 1:] = torch.randint(3, 1000, (n - 1,), generator=g)
        mask[i, -n:] = 1
    return ids, mask


def stop_steps(out, prompt_width, eos):
    """Step (0-based) at which each row emitted eos, or None."""
    steps = []
    for row in out[:, prompt_width:].tolist():
        steps.append(row.index(eos) if eos in row else None)
    return steps


@pytest.mark.parametrize("moe_impl", ["gather", "dense", "grouped"])
def test_greedy_equals_reference_with_rows_stopping_at_different_steps(model, moe_impl):
    ids, mask = padded_batch()
    free = generate(model, ids, mask, max_new_tokens=STEPS, eos_token_id=-1)
    # an "EOS" the rows reach at different steps: a token row 0 emits early and row 1 emits later (or never)
    eos = free[0, ids.shape[1] + 3].item()
    want = generate(model, ids, mask, max_new_tokens=STEPS, eos_token_id=eos)
    steps = stop_steps(want, ids.shape[1], eos)
    assert steps[0] == 3 and len(set(steps)) > 1, steps  # the batch really stops row by row

    dec = FastDecoder(model, max_batch_size=4, max_seq_len=64, moe_impl=moe_impl, sync_every=5)
    assert torch.equal(dec.generate(ids, mask, max_new_tokens=STEPS, eos_token_id=-1), free)
    got = dec.generate(ids, mask, max_new_tokens=STEPS, eos_token_id=eos)
    assert got.shape == want.shape and torch.equal(got, want)


def test_stop_sequences_streaming_and_vocab_limit_match_reference(model):
    ids, mask = padded_batch()
    free = generate(model, ids, mask, max_new_tokens=STEPS, eos_token_id=-1, vocab_limit=700)
    stop = free[1, ids.shape[1] + 6: ids.shape[1] + 8].tolist()  # row 1's tokens at steps 6-7
    seen = {"ref": [], "fast": []}
    kw = dict(max_new_tokens=STEPS, eos_token_id=-1, vocab_limit=700, stop_sequences=[stop])
    want = generate(model, ids, mask, on_tokens=lambda t, f: seen["ref"].append((t.tolist(), f.tolist())), **kw)
    dec = FastDecoder(model, max_batch_size=3, max_seq_len=48, moe_impl="gather", sync_every=4)
    got = dec.generate(ids, mask, on_tokens=lambda t, f: seen["fast"].append((t.tolist(), f.tolist())), **kw)
    assert torch.equal(got, want)
    assert seen["fast"] == seen["ref"] and len(seen["ref"]) == got.shape[1] - ids.shape[1]
    assert (got[:, ids.shape[1]:] < 700).all()


def test_mask_hiding_the_pad_bos_matches_reference(model):
    """transformers-style masks (input_ids != pad) hide OpenMoE's <pad> BOS; the reference makes it visible, counted
    in the positions of every later token."""
    ids, _ = padded_batch()
    mask = (ids != 0).long()
    want = generate(model, ids, mask, max_new_tokens=STEPS, eos_token_id=-1)
    got = FastDecoder(model, max_batch_size=3, max_seq_len=48).generate(ids, mask, max_new_tokens=STEPS,
                                                                        eos_token_id=-1)
    assert torch.equal(got, want)


def test_sampling_with_penalty_equals_reference_from_same_generator(model):
    ids, mask = padded_batch()
    kw = dict(max_new_tokens=STEPS, do_sample=True, temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.3,
              eos_token_id=-1)
    want = generate(model, ids, mask, generator=torch.Generator().manual_seed(7), **kw)
    dec = FastDecoder(model, max_batch_size=3, max_seq_len=48, moe_impl="dense")
    got = dec.generate(ids, mask, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(got, want)
    greedy = generate(model, ids, mask, max_new_tokens=STEPS, eos_token_id=-1)
    assert not torch.equal(got, greedy)  # sampling really happened


def test_static_cache_never_grows_and_refuses_oversized_requests(model):
    ids, mask = padded_batch()  # width 9
    dec = FastDecoder(model, max_batch_size=3, max_seq_len=20)
    before = [(t.data_ptr(), tuple(t.shape)) for t in dec.k_cache + dec.v_cache]
    dec.generate(ids, mask, max_new_tokens=11, eos_token_id=-1)  # 9 + 11 = 20 fits exactly
    assert [(t.data_ptr(), tuple(t.shape)) for t in dec.k_cache + dec.v_cache] == before
    with pytest.raises(ValueError, match=r"prompt \(9 tokens\) \+ max_new_tokens \(12\) = 21 exceeds the static KV "
                                         r"cache's max_seq_len \(20\)"):
        dec.generate(ids, mask, max_new_tokens=12)
    with pytest.raises(ValueError, match=r"batch size \(4\) exceeds the fast decoder's max_batch_size \(3\)"):
        dec.generate(torch.cat([ids, ids[:1]]), torch.cat([mask, mask[:1]]), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"moe_impl 'sparse' is not supported; accepted: \['auto', 'gather', "):
        FastDecoder(model, max_batch_size=1, max_seq_len=8, moe_impl="sparse")


def test_llama_family_gqa_shared_experts_equal_reference():
    """llama_moe: grouped KV heads (the static cache holds N_kv heads), scaled logits, normalized top-k, shared
    experts, no extra MLP; fast == reference for a left-padded batch and a continuous-batching slot."""
    from openmoe import OpenMoeConfig
    from openmoe.continuous import SlotDecoder

    torch.manual_seed(0)
    cfg = OpenMoeConfig(model_family="llama_moe", vocab_size=256, hidden_size=32, intermediate_size=48,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                        moe_layer_interval=1, moe_start_layer=0, router_combine="normalized", num_shared_experts=1,
                        initializer_range=0.2)
    m = OpenMoeForCausalLM(cfg).eval()
    m.apply_options(m.options.replace(dropless=True))
    ids = torch.tensor([[0, 0, 0, 5, 9, 77], [0, 12, 200, 31, 4, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    want = generate(m, ids, mask, max_new_tokens=16, eos_token_id=-1)
    assert FastDecoder(m, 2, 24).k_cache[0].shape == (2, 2, 24, 8)  # [B, N_kv, M, D]
    for impl in ("gather", "dense"):
        assert torch.equal(FastDecoder(m, 2, 24, moe_impl=impl).generate(ids, mask, max_new_tokens=16,
                                                                          eos_token_id=-1), want)
    slots = SlotDecoder(m, 2, 24)
    first = slots.admit(1, ids[0, 2:].tolist(), 16)
    assert [first] + [t[1] for t in zip(*slots.step(15))] == want[0, 6:].tolist()
