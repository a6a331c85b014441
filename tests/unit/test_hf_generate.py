"""transformers' generate on our model against references written here, and the <pad>-BOS mask rule against
upstream's: the BOS is an ordinary token at absolute position 0, attended and routed, whatever mask hides it."""

import pytest
import torch

from openmoe import ModelOptions, OpenMoeForCausalLM, preset
from openmoe.generation import generate
from openmoe.model import bos_visible_mask


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # dropless: a row's routing must not depend on the rest of the batch for "row alone == row in a batch"
    # larger weights than the default init, so that positions and routing visibly matter
    return OpenMoeForCausalLM(preset("tiny", initializer_range=0.2), options=ModelOptions(dropless=True)).eval()


def rows(*contents, width=None):
    """Left-padded [B, L] ids from per-row contents (each starting with its <pad> BOS, id 0) and the mask
    transformers builds for them (`input_ids != pad_token_id`), which hides every BOS."""
    width = width or max(len(c) for c in contents)
    ids = torch.zeros(len(contents), width, dtype=torch.long)
    for i, c in enumerate(contents):
        ids[i, width - len(c):] = torch.tensor(c)
    return ids, (ids != 0).long()


class CollectStreamer:
    """A transformers streamer that records every put() (the prompt first, then each new token) and end()."""

    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        self.chunks.append("end")


def test_bos_visible_mask_follows_the_rule():
    ids = torch.tensor([[0, 5, 6, 7, 8], [0, 0, 0, 5, 6], [0, 0, 5, 6, 7], [5, 6, 7, 8, 9], [0, 0, 0, 0, 0],
                        [7, 0, 5, 6, 8]])
    mask = torch.tensor([[0, 1, 1, 1, 1],  # BOS at column 0 hidden -> shown
                         [0, 0, 0, 1, 1],  # left padding, BOS at column 2 hidden -> only column 2 shown
                         [0, 1, 1, 1, 1],  # BOS already visible (our tokenizer's mask) -> unchanged
                         [1, 1, 1, 1, 1],  # no padding -> unchanged
                         [0, 0, 0, 0, 0],  # empty row -> unchanged
                         [0, 0, 1, 1, 1]])  # the id before the first token is a pad id -> it is the BOS
    want = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0],
                         [0, 1, 1, 1, 1]])
    assert torch.equal(bos_visible_mask(ids, mask, 0), want)


def test_hidden_bos_and_left_padding_equal_each_row_alone(model):
    """Upstream's rule, by hand: a row alone, unpadded, unmasked (BOS at position 0, every token routed)."""
    contents = [[0, 17, 300, 45, 9, 77], [0, 5, 6], [0, 400, 12, 13, 14, 15, 16]]
    ids, hf_mask = rows(*contents)
    with torch.no_grad():
        batched = model(ids, attention_mask=hf_mask).logits
        for i, c in enumerate(contents):
            alone = model(torch.tensor([c])).logits[0]
            assert torch.allclose(batched[i, -len(c):], alone, atol=1e-5), i
    # what the old rule (positions clamped at 0, BOS not routed) gave differs from upstream by far more
    old_positions = (hf_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        old = model(ids, attention_mask=hf_mask, position_ids=old_positions).logits
    assert (old[0] - batched[0]).abs().max() > 0.1


def test_generate_with_transformers_mask_equals_rows_alone(model):
    contents = [[0, 17, 300, 45], [0, 5, 6, 7, 8, 9, 10]]
    ids, _ = rows(*contents)
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=1,
                         suppress_tokens=[1])  # no attention_mask: transformers builds ids != pad (BOS hidden)
    for i, c in enumerate(contents):
        alone = model.generate(torch.tensor([c]), attention_mask=torch.ones(1, len(c), dtype=torch.long),
                               max_new_tokens=5, do_sample=False, suppress_tokens=[1])
        assert out[i, -5:].tolist() == alone[0, -5:].tolist(), i


def test_greedy_and_sampling_equal_the_reference_decode(model):
    ids, mask = rows([0, 17, 300, 45, 9], [0, 5, 6])
    mask = bos_visible_mask(ids, mask, 0)  # our tokenizer's mask shows the BOS
    want = generate(model, ids, mask, max_new_tokens=6, eos_token_id=-1)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(got, want)
    want = generate(model, ids, mask, max_new_tokens=6, eos_token_id=-1, do_sample=True, temperature=0.7, top_k=50,
                    generator=torch.Generator().manual_seed(11))
    torch.manual_seed(11)  # transformers samples from the global generator
    got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, temperature=0.7, top_k=50,
                         top_p=1.0, eos_token_id=None)
    assert torch.equal(got, want)


def beam_search(model, ids, beams, steps, banned):
    """Textbook beam search over full recomputation (no cache): keep the `beams` best continuations by summed
    log-probability. No hypothesis ever ends (the EOS is banned), so no length normalisation can reorder them."""
    hyps = [(0.0, ids)]
    for _ in range(steps):
        candidates = []
        for score, seq in hyps:
            with torch.no_grad():
                logp = model(seq[None]).logits[0, -1].log_softmax(-1)
            logp[banned] = float("-inf")
            top = logp.topk(beams)
            candidates += [(score + v.item(), torch.cat([seq, t.view(1)])) for v, t in zip(top.values, top.indices)]
        hyps = sorted(candidates, key=lambda c: -c[0])[:beams]
    return hyps[0][1]


def test_beam_search_equals_a_textbook_beam_search(model):
    ids = torch.tensor([0, 17, 300, 45, 9])
    got = model.generate(ids[None], attention_mask=torch.ones(1, 5, dtype=torch.long), num_beams=3,
                         max_new_tokens=4, do_sample=False, eos_token_id=1, suppress_tokens=[1], length_penalty=0.0)
    assert got[0].tolist() == beam_search(model, ids, 3, 4, banned=[1]).tolist()


def test_generation_config_streamer_and_stop_strings(model):
    from transformers import GenerationConfig

    ids, mask = rows([0, 17, 300, 45, 9])
    free = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
    config = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=int(free[0, -5]), pad_token_id=0)
    out = model.generate(ids, attention_mask=mask, generation_config=config)
    assert out[0, 5:].tolist() == [free[0, 5].item(), free[0, 6].item()]  # stopped at the chosen EOS

    streamer = CollectStreamer()
    model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, eos_token_id=None, streamer=streamer)
    assert streamer.chunks[0] == ids[0].tolist() and streamer.chunks[-1] == "end"
    assert sum(streamer.chunks[1:-1], []) == free[0, 5:9].tolist()


def test_stop_strings_end_generation(model):
    from openmoe.data import decode, load_tokenizer
    from openmoe.hub import SHIPPED_TOKENIZER
    from openmoe.tokenizer import to_fast

    tok = to_fast(load_tokenizer(SHIPPED_TOKENIZER))
    ids, mask = rows([0, 17, 300, 45, 9])
    mask = bos_visible_mask(ids, mask, 0)
    banned = list(range(len(tok), model.config.vocab_size)) + [1]
    free = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, suppress_tokens=banned)
    new = free[0, 5:].tolist()
    stop = decode(tok, new[:3]).strip()[-2:]  # the last characters of the first three tokens' text
    assert stop and stop not in decode(tok, new[:2])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, suppress_tokens=banned,
                         stop_strings=[stop], tokenizer=tok)
    assert out[0, 5:].tolist() == new[:3]  # stopped right after the token that completes the stop string


# --- model.generate's fast route (openmoe/fast_decode.py) against transformers' generate (fast_decode=False) ---
@pytest.fixture()
def fast_calls(model, monkeypatch):
    """Counts FastDecoder.generate calls; a fresh decoder cache on the model for each test."""
    from openmoe.fast_decode import FastDecoder

    calls = []
    real = FastDecoder.generate

    def counting(self, *a, **k):
        calls.append(self)
        return real(self, *a, **k)

    monkeypatch.setattr(FastDecoder, "generate", counting)
    model.__dict__.pop("_openmoe_fast_decoder", None)
    yield calls
    model.__dict__.pop("_openmoe_fast_decoder", None)


def test_fast_route_equals_transformers_generate(model, fast_calls):
    """Forced on CPU (fp32, dropless): the same tokens and shapes as transformers' generate over a left-padded batch
    whose rows stop at different steps, with transformers' own mask (none given), an EOS list, max_length, a
    suppressed vocabulary tail and a repetition penalty; then sampling from the same global seed."""
    ids, mask = rows([0, 17, 300, 45, 9], [0, 5, 6])
    free = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                          fast_decode=False)[:, ids.shape[1]:]
    eos = int(free[0, 2])  # row 0 stops at step 3 at the latest; row 1 later or never
    assert eos not in free[1, :3].tolist()
    cases = [dict(attention_mask=mask, max_new_tokens=8, eos_token_id=eos),
             dict(max_new_tokens=8, eos_token_id=eos, pad_token_id=0),  # transformers builds ids != pad
             dict(attention_mask=mask, max_length=ids.shape[1] + 7, eos_token_id=[int(free[1, 4]), eos],
                  suppress_tokens=list(range(700, model.config.vocab_size)), repetition_penalty=1.3)]
    results = []
    for i, case in enumerate(cases):
        want = model.generate(ids, do_sample=False, fast_decode=False, **case)
        results.append(want)
        assert not fast_calls
        got = model.generate(ids, do_sample=False, fast_decode=True, **case)
        assert len(fast_calls) == 1, i
        fast_calls.clear()
        assert got.shape == want.shape and torch.equal(got, want), (i, got, want)
    assert results[0][0, -1] == 0 and results[0][1, -1] != 0  # row 0 padded after its stop, row 1 went on
    sampled = []
    for fast in (False, True):
        torch.manual_seed(5)
        sampled.append(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, temperature=0.8,
                                      top_k=20, top_p=0.9, eos_token_id=None, fast_decode=fast))
    assert torch.equal(sampled[1], sampled[0]) and len(fast_calls) == 1


def test_fast_route_streams_and_grows_its_cache(model, fast_calls):
    """A streamer sees what transformers' generate gives it; a request larger than the cached decoder rebuilds it."""
    from transformers import GenerationConfig

    ids, mask = rows([0, 17, 300, 45, 9])
    streams = []
    for fast in (False, True):
        streams.append(CollectStreamer())
        model.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=None, streamer=streams[-1],
                       fast_decode=fast)
    assert streams[0].chunks == streams[1].chunks
    first = model.__dict__["_openmoe_fast_decoder"][1]
    assert (first.max_batch_size, first.max_seq_len) == (1, 16)  # 5 + 5 rounded up to a power of two
    ids, mask = rows([0, 17, 300, 45, 9], [0, 5, 6, 7], width=14)
    config = GenerationConfig(max_new_tokens=6, eos_token_id=None, pad_token_id=0, fast_decode=True)
    got = model.generate(ids, attention_mask=mask, generation_config=config)  # the config's field chooses
    grown = model.__dict__["_openmoe_fast_decoder"][1]
    assert grown is not first and (grown.max_batch_size, grown.max_seq_len) == (2, 32)
    assert torch.equal(got, model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None,
                                           fast_decode=False))
    assert len(fast_calls) == 2


def test_fast_route_leaves_what_it_cannot_honour_to_transformers(model, fast_calls):
    """Beams, a logits processor, stop strings, dict outputs and the CPU default run transformers' generate."""
    from transformers import LogitsProcessorList, MinLengthLogitsProcessor

    ids, mask = rows([0, 17, 300, 45, 9])
    common = dict(attention_mask=mask, max_new_tokens=4, eos_token_id=1)
    beams = model.generate(ids, num_beams=2, do_sample=False, fast_decode=True, **common)
    assert torch.equal(beams, model.generate(ids, num_beams=2, do_sample=False, fast_decode=False, **common))
    processors = LogitsProcessorList([MinLengthLogitsProcessor(9, eos_token_id=1)])
    model.generate(ids, logits_processor=processors, fast_decode=True, **common)
    out = model.generate(ids, return_dict_in_generate=True, output_scores=True, fast_decode=True, **common)
    assert len(out.scores) == out.sequences.shape[1] - ids.shape[1]
    model.generate(ids, **common)  # fast_decode None on a CPU model: the default path stays transformers'
    assert fast_calls == []
