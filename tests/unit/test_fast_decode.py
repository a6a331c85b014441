"""The static-cache fast decoder (openmoe/fast_decode.py) against its reference, the eager model.generate with
dropless routing: identical greedy tokens over 32 steps for a left-padded batch whose rows stop at different steps
and for an unpadded batch (the causal-SDPA prefill), for each MoE implementation; identical sampled tokens from the
same generator; the cache never grows; the fused-projection re-layout keeps the model's outputs bitwise and its
parameters shared; the lean decode router equals router.route; the Triton expert GEMV equals its reference
(through Triton's interpreter, where Triton is installed)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from openmoe import OpenMoeForCausalLM, fast_decode, preset
from openmoe.fast_decode import FastDecoder, decode_route, pick_moe_impl
from openmoe.generation import generate
from openmoe.router import route

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


@pytest.mark.parametrize("moe_impl", ["gather", "dense", "grouped", "gemv"])
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


@pytest.mark.parametrize("moe_impl", ["auto", "grouped"])
def test_unpadded_batch_causal_prefill_equals_reference(model, moe_impl):
    """No padding: the prefill attends through SDPA's is_causal over the S prompt columns; grouped also routes the
    prefill through the grouped GEMM (no host sync)."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 1000, (2, 7), generator=g)
    ids[:, 0] = 0
    want = generate(model, ids, torch.ones_like(ids), max_new_tokens=STEPS, eos_token_id=-1)
    got = FastDecoder(model, max_batch_size=2, max_seq_len=48, moe_impl=moe_impl).generate(
        ids, None, max_new_tokens=STEPS, eos_token_id=-1)
    assert torch.equal(got, want)


def _fusable(m):
    """(name, weight) of every projection the fast decoder fuses."""
    keep = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    return [(n, p) for n, p in m.named_parameters() if any(k in n for k in keep)]


def test_fused_projections_share_the_parameters_and_keep_the_model_outputs(tmp_path):
    torch.manual_seed(0)
    cfg = preset("tiny", initializer_range=0.2, num_shared_experts=1)  # dense, extra and shared MLPs all fused
    m = OpenMoeForCausalLM(cfg).eval()
    ids = torch.randint(3, 1000, (2, 9))
    before = m(ids).logits
    values = {n: p.detach().clone() for n, p in m.named_parameters()}
    params = dict(m.named_parameters())
    bytes_before = sum(p.numel() * p.element_size() for p in m.parameters())
    opt = torch.optim.SGD(m.parameters(), lr=0.1)  # built before the re-layout

    dec = FastDecoder(m, max_batch_size=2, max_seq_len=24)
    assert torch.equal(m(ids).logits, before)  # the eager path reads the views: bitwise the same
    assert all(torch.equal(p, values[n]) for n, p in m.named_parameters())
    assert all(p is params[n] for n, p in m.named_parameters())  # the same Parameter objects
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in m.parameters()}
    assert sum(storages.values()) == bytes_before  # re-laid, not copied: no byte more than before
    attn = m.model.layers[0].self_attn
    qkv = dec.fused[0].qkv
    assert qkv.shape[0] == sum(lin.out_features for lin in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert attn.q_proj.weight.data_ptr() == qkv.data_ptr()
    assert attn.v_proj.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    j, moe = next((j, layer) for j, layer in enumerate(m.model.layers) if layer.is_moe)
    shared = dec.fused[j].shared
    assert moe.shared_experts.up_proj.weight.untyped_storage().data_ptr() == shared.untyped_storage().data_ptr()
    assert dec.fused[j].extra is not None and dec.fused[j].mlp is None and dec.fused[0].mlp is not None

    # a second decoder reuses the buffers; both see an in-place update of a parameter
    other = FastDecoder(m, max_batch_size=2, max_seq_len=24)
    assert all(a.qkv.data_ptr() == b.qkv.data_ptr() for a, b in zip(dec.fused, other.fused))
    with torch.no_grad():
        attn.k_proj.weight.mul_(-1.0)
    assert torch.equal(qkv[attn.q_proj.out_features:][:attn.k_proj.out_features], attn.k_proj.weight)
    with torch.no_grad():
        attn.k_proj.weight.mul_(-1.0)
    # the optimizer built before the re-layout still trains what the model and the decoder read
    m(ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    assert not torch.equal(attn.v_proj.weight, values["model.layers.0.self_attn.v_proj.weight"])
    assert torch.equal(qkv[-attn.v_proj.out_features:], attn.v_proj.weight)

    # a replaced parameter breaks the aliasing: generate re-fuses and still equals the reference
    m.apply_options(m.options.replace(dropless=True))
    attn.v_proj.weight = torch.nn.Parameter(attn.v_proj.weight.detach().clone())
    mask = torch.ones_like(ids)
    want = generate(m, ids, mask, max_new_tokens=8, eos_token_id=-1)
    assert torch.equal(dec.generate(ids, mask, max_new_tokens=8, eos_token_id=-1), want)
    assert dec.fused[0].qkv.data_ptr() != qkv.data_ptr()  # a new buffer, the replaced weight is a view of it
    assert attn.v_proj.weight.untyped_storage().data_ptr() == dec.fused[0].qkv.untyped_storage().data_ptr()

    # the views do not overlap: save_pretrained writes them and they load back equal
    m.save_pretrained(tmp_path)
    loaded = OpenMoeForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(p, dict(m.named_parameters())[n]) for n, p in loaded.named_parameters())


def test_unfused_decoder_equals_reference(model):
    ids, mask = padded_batch()
    want = generate(model, ids, mask, max_new_tokens=STEPS, eos_token_id=-1)
    dec = FastDecoder(model, max_batch_size=3, max_seq_len=48, moe_impl="gather", fuse_weights=False)
    assert all(f.qkv is None for f in dec.fused)
    assert torch.equal(dec.generate(ids, mask, max_new_tokens=STEPS, eos_token_id=-1), want)


@pytest.mark.parametrize("combine", ["prob", "normalized"])
def test_decode_route_equals_router_route(model, combine):
    mlp = next(layer.mlp for layer in model.model.layers if layer.is_moe)
    x = torch.randn(5, model.config.hidden_size)
    for bias in (None, torch.linspace(-0.2, 0.2, mlp.num_experts)):
        mlp.selection_bias, mlp.router_combine = bias, combine
        want = route(x, mlp.gate_weight, mlp.top_k, 0.0, mlp.min_capacity, True, None, bias, combine,
                     size_dropless=False)
        got = decode_route(mlp, x)
        assert torch.equal(got.expert_idx, want.expert_idx)
        assert torch.equal(got.combine_weight, want.combine_weight) and got.keep.all()
    mlp.selection_bias, mlp.router_combine = None, model.config.router_combine


def test_auto_picks_gemv_for_few_pairs_on_cuda_bf16(monkeypatch):
    monkeypatch.setattr(fast_decode, "HAS_TRITON", True)
    assert pick_moe_impl("auto", 1, 2, 32, grouped_ok=True) == "gemv"
    assert pick_moe_impl("auto", 4, 2, 32, grouped_ok=True) == "gemv"
    assert pick_moe_impl("auto", 16, 2, 32, grouped_ok=True) == "grouped"
    assert pick_moe_impl("auto", 1, 2, 32, grouped_ok=False) == "gather"  # CPU / fp32
    monkeypatch.setattr(fast_decode, "HAS_TRITON", False)
    assert pick_moe_impl("auto", 1, 2, 32, grouped_ok=True) == "grouped"


def test_triton_expert_gemv_equals_reference_in_the_interpreter():
    """The kernels themselves, on the CPU through TRITON_INTERPRET=1 (set before triton is imported, hence the
    subprocess): odd sizes exercise the masks, I >= 512 the split-K down projection, three tilings (the fused and
    the split-K gate/up pass); both expert families; the dense GEMV (linear_gemv) against x @ w.T; the decode RoPE
    and cache-write kernel against apply_rope and indexed writes."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from openmoe.decode_kernels import GemvTiles, gathered_experts, linear_gemv, triton_expert_gemv
        from openmoe.moe import LlamaExperts, OpenMoeExperts
        from openmoe.router import route
        torch.manual_seed(0)
        tilings = (GemvTiles(), GemvTiles(gate_block_n=64, gate_block_k=64, down_split=16, down_block_k=64),
                   GemvTiles(gate_split=2, gate_block_k=32))  # fused gate/up pass, other tiles, split-K gate/up
        for cls in (OpenMoeExperts, LlamaExperts):
            for e, h, i, t in ((4, 96, 200, 3), (8, 64, 1024, 1)):
                ex = cls(e, h, i)
                for w in (ex.wi_gate, ex.wi_up, ex.wo):
                    torch.nn.init.normal_(w, 0, 0.2)
                x = torch.randn(t, h)
                r = route(x, torch.randn(e, h), 2, 0.0, 0, True, size_dropless=False)
                for tiles in tilings:
                    with torch.no_grad():
                        got, want = triton_expert_gemv(ex, x, r, tiles), gathered_experts(ex, x, r)
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        from openmoe.decode_kernels import rope_qkv_into_cache
        from openmoe.model import apply_rope
        for b, n, n_kv, d in ((2, 4, 2, 16), (1, 3, 3, 8)):  # RoPE + cache writes of one token per row
            qkv, angles = torch.randn(b, (n + 2 * n_kv) * d), torch.randn(b, d // 2)
            cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
            k_cache, v_cache = torch.randn(3, n_kv, 10, d), torch.randn(3, n_kv, 10, d)
            want_k, want_v = k_cache.clone(), v_cache.clone()
            q = rope_qkv_into_cache(qkv, cos[:, None], sin[:, None], k_cache, v_cache, torch.tensor([7]), n, n_kv)
            heads = qkv.view(b, n + 2 * n_kv, 1, d)
            rot = apply_rope(heads[:, :n + n_kv], cos[:, None], sin[:, None])
            want_k[:b, :, 7] = rot[:, n:, 0]
            want_v[:b, :, 7] = heads[:, n + n_kv:, 0]
            torch.testing.assert_close(q, rot[:, :n])
            torch.testing.assert_close(k_cache, want_k)  # column 7 of the first b rows only
            torch.testing.assert_close(v_cache, want_v)
        for n, k, t in ((48, 300, 1), (33, 1024, 2)):  # the dense GEMV: odd sizes, one and two splits, two rows
            w, x = torch.randn(n, k), torch.randn(t, k)
            for tiles in (GemvTiles(), GemvTiles(dense_block_n=8, dense_block_k=64, dense_split=4)):
                want = x @ w.T
                torch.testing.assert_close(linear_gemv(x, w, tiles), want, rtol=1e-4,
                                           atol=1e-4 * want.abs().max().item())
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


class _LowRankAdapter(torch.nn.Module):
    """A LoRA-like wrapper (as PEFT injects): base projection plus a low-rank delta the fused GEMV would miss."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base_layer = base
        self.a = torch.nn.Parameter(torch.randn(rank, base.in_features) * 0.5)
        self.b = torch.nn.Parameter(torch.randn(base.out_features, rank) * 0.5)

    @property
    def weight(self):
        return self.base_layer.weight

    def forward(self, x):
        return self.base_layer(x) + x @ self.a.T @ self.b.T


def test_adapted_projections_stay_unfused_and_equal_reference():
    torch.manual_seed(0)
    m = OpenMoeForCausalLM(preset("tiny", initializer_range=0.2)).eval()
    m.apply_options(m.options.replace(dropless=True))
    attn, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
    attn.k_proj = _LowRankAdapter(attn.k_proj)
    mlp.up_proj = _LowRankAdapter(mlp.up_proj)
    ids, mask = padded_batch()
    want = generate(m, ids, mask, max_new_tokens=STEPS, eos_token_id=-1)
    dec = FastDecoder(m, max_batch_size=3, max_seq_len=48, moe_impl="gather")
    assert dec.fused[0].qkv is None and dec.fused[0].mlp is None and dec.fused[1].qkv is not None
    assert torch.equal(dec.generate(ids, mask, max_new_tokens=STEPS, eos_token_id=-1), want)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_greedy_step_with_penalty_limit_and_many_stops_equals_reference(model, compile):
    """The greedy step that chooses and keeps its books on the device (compiled: the whole step in one graph,
    updating the decoder's state in place) under a repetition penalty, a vocabulary limit, an EOS and more and
    longer stop sequences than the decoder's first stop table holds (it grows)."""
    ids, mask = padded_batch()
    kw = dict(max_new_tokens=20, repetition_penalty=1.5, vocab_limit=600)
    free = generate(model, ids, mask, eos_token_id=-1, **kw)
    new = free[:, ids.shape[1]:]
    assert len(set(new[0].tolist())) > 4  # the penalty leaves a varied row to cut stops from
    long_stop = new[2, 1:19].tolist()  # 18 tokens: longer than the table's 16 columns; row 2 stops at step 18
    stops = [[-5 - j] for j in range(fast_decode.STOPS)] + [new[1, 5:7].tolist(), long_stop]
    eos = new[0, 9].item()
    want = generate(model, ids, mask, eos_token_id=eos, stop_sequences=stops, **kw)
    assert stop_steps(want, ids.shape[1], eos)[0] == 9 and want.shape[1] > ids.shape[1] + 8
    dec = FastDecoder(model, max_batch_size=4, max_seq_len=40, moe_impl="gather", compile=compile, sync_every=3)
    got = dec.generate(ids, mask, eos_token_id=eos, stop_sequences=stops, **kw)
    assert torch.equal(got, want)
    assert dec.state.stops.shape == (16, 32)  # 10 stops of up to 18 tokens: grown to powers of two
    # a request after the stopped one starts from a clean state (the grown table: the same compiled graph)
    assert torch.equal(dec.generate(ids, mask, eos_token_id=-1, **kw), free)


def test_greedy_argmax_is_torch_argmax_with_ties_and_padding():
    g = torch.Generator().manual_seed(0)
    for b, v in ((3, 1000), (2, 256), (1, 129)):  # V not a multiple of the 128 slices, and V < 2 slices wide
        logits = torch.randn(b, v, generator=g)
        logits[0, v // 3] = logits[0, v - 2] = logits[0].max() + 1  # a tie across slices: the first one wins
        logits[-1, 5] = float("-inf")
        assert torch.equal(fast_decode.greedy_argmax(logits), logits.argmax(-1))
    ties = torch.zeros(2, 300)  # all equal: index 0
    assert fast_decode.greedy_argmax(ties).tolist() == [0, 0]


def test_finished_batch_stops_within_two_windows_and_streams_every_step(model):
    """The host reads the flags of the window before (no drain of the GPU): a batch whose rows have all stopped runs
    at most one more window of steps, and on_tokens still sees exactly the reference's steps."""
    ids, mask = padded_batch()
    free = generate(model, ids, mask, max_new_tokens=STEPS, eos_token_id=-1)
    eos = free[:, ids.shape[1] + 2].tolist()  # every row stops by step 2 if each row's step-2 token is an EOS
    seen = {"ref": [], "fast": []}
    want = generate(model, ids, mask, max_new_tokens=STEPS, eos_token_id=eos[0], stop_sequences=[[e] for e in eos],
                    on_tokens=lambda t, f: seen["ref"].append((t.tolist(), f.tolist())))
    assert want.shape[1] <= ids.shape[1] + 3
    dec = FastDecoder(model, max_batch_size=3, max_seq_len=48, moe_impl="gather", sync_every=4)
    steps = []
    greedy = dec._greedy
    dec._greedy = lambda b: (steps.append(b), greedy(b))
    got = dec.generate(ids, mask, max_new_tokens=STEPS, eos_token_id=eos[0], stop_sequences=[[e] for e in eos],
                       on_tokens=lambda t, f: seen["fast"].append((t.tolist(), f.tolist())))
    assert torch.equal(got, want) and seen["fast"] == seen["ref"]
    assert len(steps) + 1 == 8  # done after step 2, read at the step-8 check (the window of steps 1-4): 8 steps
