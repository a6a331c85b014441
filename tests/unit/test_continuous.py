"""Continuous batching (openmoe/continuous.py) against the reference: each sequence's greedy tokens equal
generation.generate on its prompt alone, while other sequences join, stop (EOS, max_tokens) and leave mid-flight and
a released slot is reused."""

import pytest
import torch

from openmoe import OpenMoeForCausalLM, preset
from openmoe.continuous import SlotDecoder
from openmoe.generation import generate

PROMPTS = [[0, 17, 260, 95, 4, 33, 710], [0, 321], [0, 44, 45, 46, 47], [0, 512, 8, 9]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = OpenMoeForCausalLM(preset("tiny", initializer_range=0.2)).eval()  # sharp: wrong columns change tokens
    m.apply_options(m.options.replace(dropless=True))
    return m


def alone(model, prompt, n, eos=-1, penalty=1.0):
    ids = torch.tensor([prompt])
    out = generate(model, ids, torch.ones_like(ids), max_new_tokens=n, eos_token_id=eos,
                   repetition_penalty=penalty)[0, len(prompt):].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


def run_until_done(dec, got, budget, eos):
    """Step 3 at a time; collect each slot's tokens until EOS or its budget, then release it."""
    while budget:
        for slot, toks in enumerate(dec.step(3)):
            if slot not in budget:
                continue
            for t in toks:
                got[slot].append(t)
                if t == eos or len(got[slot]) == budget[slot]:
                    dec.release(slot)
                    del budget[slot]
                    break


@pytest.mark.parametrize("moe_impl", ["gather", "dense"])
def test_slots_joining_and_leaving_equal_each_prompt_alone(model, moe_impl):
    eos = alone(model, PROMPTS[2], 20)[9]  # prompt 2 stops at its 10th token; the others run to their budget
    want = {i: alone(model, p, n, eos) for i, (p, n) in enumerate(zip(PROMPTS, (20, 14, 20, 6)))}
    assert len(want[2]) == 10 and want[2][-1] == eos and all(len(want[i]) == n for i, n in ((0, 20), (1, 14)))
    model.config.eos_token_id, saved = eos, model.config.eos_token_id
    try:
        dec = SlotDecoder(model, max_batch_size=3, max_seq_len=32, moe_impl=moe_impl)
        got, budget = {}, {}
        for slot, i, n in ((0, 0, 20), (2, 1, 14)):  # two sequences start ...
            got[slot], budget[slot] = [dec.admit(slot, PROMPTS[i], n)], n
        for slot, toks in enumerate(dec.step(4)):  # ... decode 4 steps ...
            if slot in got:
                got[slot] += toks
        got[1], budget[1] = [dec.admit(1, PROMPTS[2], 20)], 20  # ... a third joins between steps
        budget[0], budget[2] = 20, 14
        run_until_done(dec, got, budget, eos)
        assert got == {0: want[0], 2: want[1], 1: want[2]}
        # slot 1 stopped at EOS and was released: a new prompt in it must not see the old cache
        assert dec.admit(1, PROMPTS[3], 6) == want[3][0]
        got, budget = {1: [want[3][0]]}, {1: 6}
        run_until_done(dec, got, budget, eos)
        assert got[1] == want[3]
    finally:
        model.config.eos_token_id = saved


def test_repetition_penalty_and_cache_bounds(model):
    dec = SlotDecoder(model, max_batch_size=2, max_seq_len=12)
    dec.configure(repetition_penalty=1.5)
    got = [dec.admit(1, PROMPTS[2], 7)]  # 5 + 7 = 12 fits exactly
    for toks in zip(*dec.step(8)):  # more steps than the budget: the slot stops on the device at 7 tokens
        got.append(toks[1])
    assert got[:7] == alone(model, PROMPTS[2], 7, penalty=1.5) and got[7:] == [0, 0]
    with pytest.raises(ValueError, match=r"prompt \(5 tokens\) \+ max_new_tokens \(8\) = 13 exceeds the static KV "
                                         r"cache's max_seq_len \(12\)"):
        dec.admit(0, PROMPTS[2], 8)
