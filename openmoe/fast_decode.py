"""Fast decoding for a loaded OpenMoeForCausalLM with no host synchronisation per token (gpt-fast style).

    dec = FastDecoder(model, max_batch_size=16, max_seq_len=2048, compile=True)   # shares the model's weights
    ids = dec.generate(input_ids, attention_mask, max_new_tokens=64)             # model.generate's arguments/result

Shapes: B batch, S prompt width, M max_seq_len (static cache length), H hidden, N heads, N_kv KV heads, D head_dim,
E experts, K top-k, I expert width, V vocabulary, T tokens (B * S at prefill, B at decode), n new tokens.

The eager `model.generate` (openmoe/generation.py) is the reference; with dropless routing on the model
(`ModelOptions(dropless=True)`) both give the same tokens (tests/unit/test_fast_decode.py). What differs, and why:
  * KV cache: one preallocated [B_max, N_kv, M, D] pair per layer, written in place at a column index held on the
    device; every decode step attends over all M columns under a key mask, so each step has the same shapes and can
    be captured once as a CUDA graph. Columns follow the reference: the left-padded prompt in [0, S), new token i in
    column S + i. A request longer than M is refused; the cache never grows.
  * MoE at decode: dropless top-k routing (router.route, no capacity) and experts without data-dependent shapes:
      "gemv"    a Triton GEMV per (token, choice) indexed by expert id (openmoe/decode_kernels.py): reads only the
                T * K chosen experts, no copies, no large-M tiles; CUDA only, elsewhere its reference ("gather");
      "gather"  the chosen experts' weights gathered per token ([T, K, H, I] copies): reads only T * K experts;
      "grouped" choices sorted by expert, one grouped GEMM per weight with device-side offsets (moe.grouped_experts):
                no copies, reads only touched experts (needs torch._grouped_mm);
      "dense"   every expert on every token, weighted by a [T, E] matrix that is zero off the top-k: reads each
                expert once, the cheapest once most experts are touched (batch 16 of 32 experts, top-2).
    Prefill routes dropless through the grouped GEMM ("grouped", and "auto"/"gemv" on CUDA bf16): no
    host sync; otherwise (CPU, fp32) through the reference dispatch/combine, whose buffer is sized by one host sync
    per MoE layer per request.
  * Prefill attention runs over the prompt's S columns only (not the M-column cache): SDPA with is_causal when no
    row is padded (the flash kernel on CUDA), else with the [B, 1, S, S] padding-and-causal mask. Deciding which
    reads mask.all() on the host once per request.
  * Fused projections (fuse_weights=True): one GEMV for q/k/v and one for gate/up per dense MLP, extra MLP and
    shared experts. At M = 1 a GEMV is bandwidth-bound, and cuBLAS reaches a higher fraction of it on one large
    matrix than on three 12.6 MB ones (the LM head ran at 4.3 TB/s, the q/k/v GEMVs near 2 TB/s). No memory is
    added: at construction each group's weights are copied once into one contiguous [sum of outputs, H] buffer and
    the modules' `weight` parameters (the same Parameter objects) get row views of it as their data (each old
    storage is freed as its view replaces it, so the peak is one group's extra copy). The model keeps working
    unchanged (its projections read the views: the same values, bitwise the same outputs), every FastDecoder over
    the model shares the buffers, and an in-place update of a parameter (load_state_dict, an optimizer built
    before or after) is seen by the decoder. A group with
    anything but plain bias-free nn.Linear modules (PEFT's LoRA layers, hooks) is left unfused and runs its modules.
    We chose this over
    (a) keeping a fused copy (a second copy of the fused weights: 3.1 GB more for OpenMoE-8B) and (b) concatenating per
    step (a copy per step costs more than it saves). A parameter whose data is *replaced* afterwards
    (model.to(dtype), a new nn.Parameter) breaks the aliasing; generate() checks it on the host each call and
    re-fuses. The views do not
    overlap, so save_pretrained (safetensors) still writes the model (tested).
  * The loop's state (tokens, positions, finished flags, repetition-penalty presence, key mask, new tokens, the stop
    table) is one DecodeState at fixed addresses. A greedy step is compiled whole: model, argmax (two-stage:
    greedy_argmax), stop checks and bookkeeping update the state inside one CUDA graph, nothing runs outside it per
    token. Sampling compiles the model only (its generator's draw stays eager).
  * Host reads: every sync_every steps the flags (and, when streaming, the new tokens) are copied to the host without
    waiting, and the copy of the window before is read, so the GPU always has steps queued (reading the current
    flags would drain it). A batch that finished runs up to one more window, never reported.
  * On CUDA bf16, at decode: a Triton GEMV for o_proj and down_proj of one row (dense_gemv: one kernel where cuBLAS
    runs a split-K GEMV and a reduce) and one Triton kernel for RoPE and both cache writes of the fused q/k/v row
    (rope_kernel); decode_kernels.py holds both, tested against torch references.
Built for one device: expert-parallel layers and device maps are refused (their eager paths remain).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from openmoe.decode_kernels import (
    HAS_TRITON,
    GemvTiles,
    expert_gemv,
    gathered_experts,
    linear_gemv,
    rope_qkv_into_cache,
)
from openmoe.generation import process_logits
from openmoe.model import (
    OpenMoeMLP,
    _attention_allowed,
    apply_rope,
    bos_visible_mask,
    default_positions,
    repeat_kv,
    rope_cos_sin,
)
from openmoe.moe import HAS_GROUPED_MM, OpenMoeSparseMLP, combine, dispatch, grouped_experts
from openmoe.router import RouterOutput, combine_weights, route, select_experts

MOE_IMPLS = ("auto", "gather", "grouped", "dense", "gemv")
GEMV_MAX_PAIRS = 8  # "auto" takes the Triton GEMV up to this many (token, choice) pairs per step, then grouped
STOP_LEN, STOPS = 16, 8  # the stop table's first size: longer or more stop sequences grow it (a recompile)


def pick_moe_impl(impl: str, num_tokens: int, top_k: int, num_experts: int, grouped_ok: bool = False) -> str:
    """'auto' on CUDA bf16 (grouped_ok): the Triton GEMV for a few (token, choice) pairs (reads only the chosen
    experts, GEMV-shaped), grouped beyond (reads only the touched experts, copies nothing, tiles fill up). Else gather
    while the gathered copies (written once, read once: ~3x the chosen experts' bytes) cost less than reading every
    expert once, then dense."""
    if impl not in MOE_IMPLS:
        raise ValueError(f"moe_impl '{impl}' is not supported; accepted: {list(MOE_IMPLS)}")
    if impl == "grouped" and not HAS_GROUPED_MM:
        raise ValueError("moe_impl 'grouped' needs torch._grouped_mm, which this torch lacks; use 'gather' or 'dense'")
    if impl != "auto":
        return impl
    if grouped_ok and HAS_TRITON and num_tokens * top_k <= GEMV_MAX_PAIRS:
        return "gemv"
    if grouped_ok and HAS_GROUPED_MM:
        return "grouped"
    return "gather" if 3 * num_tokens * top_k < num_experts else "dense"


def decode_route(mlp: OpenMoeSparseMLP, x: torch.Tensor) -> RouterOutput:
    """Dropless top-k of x [T, H] with the layer's router, bias and combine rule; no host sync (capacity left 0).
    router.route's numbers (fp32 logits, softmax, biased selection, combine weights) without its load counts, which
    nothing at decode reads: fewer kernels per MoE layer."""
    logits, probs, expert_idx = select_experts(x, mlp.gate_weight, mlp.top_k, mlp.selection_bias)
    keep = torch.ones_like(expert_idx, dtype=torch.bool)
    return RouterOutput(expert_idx=expert_idx, combine_weight=combine_weights(probs, expert_idx, mlp.router_combine),
                        slot=None, keep=keep, capacity=0, logits=logits, probs=probs,
                        token_mask=keep[:, 0], tokens_per_expert=torch.zeros_like(probs[0], dtype=torch.long))


def fuse_linears(linears: Sequence[nn.Linear]) -> torch.Tensor:
    """One [sum of out_features, in_features] buffer holding the weights of `linears` (same input, dtype, device),
    each module's weight parameter re-pointed to its row view (memory-neutral: see the module docstring). Weights
    that are already consecutive views of one buffer (an earlier FastDecoder's) are returned as that buffer."""
    weights = [lin.weight for lin in linears]
    fused = _fused_view(weights)
    if fused is not None:
        return fused
    w0 = weights[0]
    rows = sum(w.shape[0] for w in weights)
    with torch.no_grad():
        buf = torch.empty(rows, w0.shape[1], dtype=w0.dtype, device=w0.device)  # [sum out, in]
        start = 0
        for lin, w in zip(linears, weights):
            n = w.shape[0]
            buf[start:start + n].copy_(w)
            # the same Parameter object, its data now a view of buf (the old storage is freed): optimizers and
            # anything else holding the parameter keep updating what the model and the decoder read
            w.data = buf[start:start + n]
            start += n
    return buf


def _fused_view(weights: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The [sum out, in] tensor over `weights` when they are consecutive contiguous row blocks of one storage."""
    w0 = weights[0]
    storage, offset = w0.untyped_storage(), w0.storage_offset()
    for w in weights:
        if (not w.is_contiguous() or w.untyped_storage().data_ptr() != storage.data_ptr()
                or w.storage_offset() != offset or w.dtype != w0.dtype or w.shape[1:] != w0.shape[1:]):
            return None
        offset += w.numel()
    rows = sum(w.shape[0] for w in weights)
    return w0.detach().new_empty(0).set_(storage, w0.storage_offset(), (rows, w0.shape[1]), (w0.shape[1], 1))


def _plain_linear(m: nn.Module) -> bool:
    """Only a bias-free nn.Linear without hooks computes exactly x @ weight.T, what the fused GEMV replaces."""
    return (type(m) is nn.Linear and m.bias is None and not m._forward_hooks and not m._forward_pre_hooks)


@dataclass
class FusedWeights:
    """One decoder layer's fused projection buffers (None where the layer has no such module or fusion is off)."""

    qkv: torch.Tensor | None = None  # [N * D + 2 * N_kv * D, H]: q, k, v rows
    mlp: torch.Tensor | None = None  # [G + I, H]: gate rows, then up rows (dense MLP layers)
    shared: torch.Tensor | None = None  # shared experts' gate/up
    extra: torch.Tensor | None = None  # the extra MLP's gate/up (OpenMoE's MoE layers)


ANY_TOKEN = -2  # a stop-table cell that matches any token (stops are right-aligned in rows of the table's width)


@dataclass
class DecodeState:
    """The generation loop's device state, allocated once per decoder for max_batch_size rows at fixed addresses (a
    request uses rows [:B]), so that the compiled greedy step reads and updates it in place inside its CUDA graph:
    no input copies, no per-step launches outside the graph. L: stop-table width, n_stop: its rows."""

    tokens: torch.Tensor  # [B_max] long: the last chosen token, fed to the next step
    positions: torch.Tensor  # [B_max] long: its position
    count: torch.Tensor  # [B_max] long: real tokens so far (the next position is count - 1 + ...)
    finished: torch.Tensor  # [B_max] bool
    presence: torch.Tensor  # [B_max, V] bool: ids in the row so far (repetition penalty)
    key_mask: torch.Tensor  # [B_max, M] bool: cache columns later steps may attend
    out: torch.Tensor  # [B_max, M] long: new token of each step
    done_after: torch.Tensor  # [B_max, M] bool: finished after each step
    tail: torch.Tensor  # [B_max, L] long: the last L new tokens, -1 where none yet
    stops: torch.Tensor  # [n_stop, L] long: stop sequences right-aligned, ANY_TOKEN before them
    stop_used: torch.Tensor  # [n_stop] bool: rows of the table in use
    step: torch.Tensor  # [1] long: index of the last chosen token
    col: torch.Tensor  # [1] long: its cache column (S + step)
    n_steps: torch.Tensor  # [] long: steps the reference would run
    eos: torch.Tensor  # [] long
    penalty: torch.Tensor  # [] fp32 repetition penalty (1.0: none)
    vocab_limit: torch.Tensor  # [] long: ids >= this are never chosen (V: none)

    @classmethod
    def allocate(cls, batch: int, max_seq_len: int, vocab: int, stop_len: int, n_stop: int,
                 device: torch.device) -> DecodeState:
        def zeros(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=device)

        state = cls(tokens=zeros(batch), positions=zeros(batch), count=zeros(batch),
                    finished=zeros(batch, dtype=torch.bool), presence=zeros(batch, vocab, dtype=torch.bool),
                    key_mask=zeros(batch, max_seq_len, dtype=torch.bool), out=zeros(batch, max_seq_len),
                    done_after=zeros(batch, max_seq_len, dtype=torch.bool), tail=None, stops=None, stop_used=None,
                    step=zeros(1), col=zeros(1), n_steps=zeros(), eos=zeros(), penalty=zeros(dtype=torch.float32),
                    vocab_limit=zeros())
        for t in vars(state).values():
            if t is not None:
                torch._dynamo.mark_static_address(t)  # fixed addresses, as for the cache
        state.size_stop_table(stop_len, n_stop)
        return state

    def size_stop_table(self, width: int, rows: int) -> None:
        """(Re)allocate tail [B_max, width], stops [rows, width] and stop_used [rows] at new fixed addresses."""
        batch, device = self.tokens.shape[0], self.tokens.device
        self.tail = torch.zeros(batch, width, dtype=torch.long, device=device)
        self.stops = torch.zeros(rows, width, dtype=torch.long, device=device)
        self.stop_used = torch.zeros(rows, dtype=torch.bool, device=device)
        for t in (self.tail, self.stops, self.stop_used):
            torch._dynamo.mark_static_address(t)


def limit_logits(logits: torch.Tensor, presence: torch.Tensor, penalty, vocab_limit) -> torch.Tensor:
    """logits [B, V] fp32 -> [B, V]: ids >= vocab_limit at -inf, the ids in `presence` [B, V] penalised (positive
    logits divided by the penalty, negative ones multiplied: the reference's rule). penalty and vocab_limit are
    numbers or device scalars (the compiled step reads them from the DecodeState); 1.0 and V change nothing."""
    ids = torch.arange(logits.shape[-1], device=logits.device)
    logits = logits.masked_fill(ids >= vocab_limit, float("-inf"))
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(presence, penalised, logits)


def decode_bias(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """visible [B, M] bool (the cache columns one decode query may attend) -> the additive mask [B, 1, 1, M] (0 or
    -inf), built once per step: given a boolean mask, SDPA converts it again in every layer (one kernel each)."""
    bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, float("-inf"))
    return bias[:, None, None, :]


def greedy_argmax(logits: torch.Tensor, chunks: int = 128) -> torch.Tensor:
    """logits [B, V] -> the first index of each row's maximum [B] (torch.argmax's result), in two stages: the
    maximum of each of `chunks` slices, then of those. Inductor compiles a one-row argmax over V = 256k as one
    thread block (86 us per step on the H200); B * chunks rows fill the GPU."""
    b, v = logits.shape
    pad = (-v) % chunks
    if pad:
        logits = F.pad(logits, (0, pad), value=float("-inf"))
    values, index = logits.view(b, chunks, -1).max(-1)  # [B, C]: each slice's maximum and its first index
    best = values.argmax(-1, keepdim=True)  # [B, 1]: the first slice holding the row's maximum
    return (best * (logits.shape[-1] // chunks) + index.gather(1, best)).squeeze(1)


def fused_mlp(mlp: OpenMoeMLP, gate_up: torch.Tensor | None, x: torch.Tensor, linear=None) -> torch.Tensor:
    """OpenMoeMLP.forward with gate and up read by one GEMV over their fused buffer; linear(module, x) runs the down
    projection (None: the module)."""
    if gate_up is None:
        return mlp(x)
    gate, up = F.linear(x, gate_up).split([mlp.gate_proj.out_features, mlp.up_proj.out_features], dim=-1)
    h = mlp.act(gate) * up
    return mlp.down_proj(h) if linear is None else linear(mlp.down_proj, h)


def dense_experts(experts, x: torch.Tensor, r: RouterOutput) -> torch.Tensor:
    """x [T, H] -> [T, H]: every expert on every token, summed with weights that are zero off the chosen experts."""
    num_experts = experts.num_local_experts
    y = experts(x[None].expand(num_experts, *x.shape))  # [E, T, H]
    w = torch.zeros(x.shape[0], num_experts, device=x.device).scatter(1, r.expert_idx, r.combine_weight)  # [T, E]
    return torch.einsum("te,eth->th", w.to(y.dtype), y)


class FastDecoder:
    """Static-cache decoder over a loaded model's modules (weights shared, nothing copied, model.py untouched)."""

    def __init__(self, model, max_batch_size: int, max_seq_len: int, moe_impl: str = "auto", compile: bool = False,
                 sync_every: int = 8, fuse_weights: bool = True, gemv_tiles: GemvTiles | None = None,
                 dense_gemv: bool = True, rope_kernel: bool = True):
        cfg = model.config
        for i, layer in enumerate(model.model.layers):
            if layer.is_moe and not isinstance(layer.mlp, OpenMoeSparseMLP):
                raise ValueError(f"layer {i} is {type(layer.mlp).__name__}; the fast decoder runs single-device "
                                 "OpenMoeSparseMLP layers only (expert-parallel serving uses model.generate)")
        devices = {p.device for p in model.parameters()}
        if len(devices) != 1 or hasattr(model, "hf_device_map"):
            raise ValueError(f"the fast decoder needs the whole model on one device, found {sorted(map(str, devices))}")
        for name, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len),
                            ("sync_every", sync_every)):
            if value < 1:
                raise ValueError(f"{name} ({value}) must be >= 1")
        pick_moe_impl(moe_impl, 1, cfg.router_topk, cfg.num_experts)  # validate now, choose per batch size later
        self.model, self.config, self.moe_impl, self.sync_every = model, cfg, moe_impl, sync_every
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        weight = model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        shape = (max_batch_size, cfg.num_key_value_heads, max_seq_len, cfg.head_dim)  # [B_max, N_kv, M, D]
        self.k_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in model.model.layers]
        self.v_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in model.model.layers]
        for t in self.k_cache + self.v_cache:
            # fixed addresses: CUDA graphs replay writes into the same memory, and compile does not copy the cache
            torch._dynamo.mark_static_address(t)
        # CUDA bf16: the grouped GEMM at prefill (no host sync) and the GEMV/grouped choice at decode
        self.grouped_ok = self.device.type == "cuda" and self.dtype == torch.bfloat16
        self.fuse_weights = fuse_weights
        self.gemv_tiles = gemv_tiles  # tile sizes of the "gemv" expert kernels (None: decode_kernels' defaults)
        # o_proj and down_proj of one decode row through decode_kernels.linear_gemv (CUDA bf16 with Triton)
        self.dense_gemv = dense_gemv and self.grouped_ok and HAS_TRITON
        # decode: RoPE and the cache writes of the fused q/k/v row in one Triton kernel (rope_qkv_into_cache)
        self.rope_kernel = (rope_kernel and self.grouped_ok and HAS_TRITON and fuse_weights
                            and cfg.head_dim % 2 == 0 and (cfg.head_dim // 2) & (cfg.head_dim // 2 - 1) == 0)
        self.fused = [FusedWeights() for _ in model.model.layers]
        self.fuse_projections()
        self.state = DecodeState.allocate(max_batch_size, max_seq_len, cfg.vocab_size, STOP_LEN, STOPS, self.device)
        self._step, self._greedy = self._decode_step, self._greedy_step
        if compile:
            # static shapes: one graph per batch size, never a dynamic-shape recompile. Greedy decoding compiles the
            # whole step (model, choice, bookkeeping: one CUDA graph replay per token); sampling compiles the model
            # and chooses eagerly (its generator cannot enter the graph)
            options = dict(mode="reduce-overhead", fullgraph=True, dynamic=False)
            self._step = torch.compile(self._decode_step, **options)
            self._greedy = torch.compile(self._greedy_step, **options)
        self._compiled = compile

    # ----------------------------------------------------------------------------------------------- fused weights
    def fuse_projections(self) -> None:
        """(Re-)fuse each layer's projections unless the modules' weights are still views of the held buffers
        (a host-side pointer check, run at construction and at each generate call)."""
        if not self.fuse_weights:
            return
        for i, layer in enumerate(self.model.model.layers):
            f, attn = self.fused[i], layer.self_attn
            f.qkv = self._fuse(f.qkv, [attn.q_proj, attn.k_proj, attn.v_proj])
            if not layer.is_moe:
                f.mlp = self._fuse(f.mlp, [layer.mlp.gate_proj, layer.mlp.up_proj])
            if layer.has_shared:
                f.shared = self._fuse(f.shared, [layer.shared_experts.gate_proj, layer.shared_experts.up_proj])
            if layer.has_extra:
                f.extra = self._fuse(f.extra, [layer.extra_mlp.gate_proj, layer.extra_mlp.up_proj])

    def _fuse(self, held: torch.Tensor | None, linears) -> torch.Tensor | None:
        if not all(_plain_linear(lin) for lin in linears):
            return None  # an adapter (PEFT's LoRA layers), a bias or a hook: the modules run as they are
        if held is not None and _fused_view([lin.weight for lin in linears]) is not None \
                and linears[0].weight.data_ptr() == held.data_ptr():
            return held
        buf = fuse_linears(linears)
        # a fixed address, as for the cache: compiled CUDA graphs read it in place instead of copying it per replay
        torch._dynamo.mark_static_address(buf)
        return buf

    # ---------------------------------------------------------------------------------------------------- layers
    def _qkv(self, i, attn, x, cos, sin):
        """x [B, S, H] -> q [B, N, S, D], k, v [B, N_kv, S, D], RoPE applied to q and k."""
        b, s, _ = x.shape
        nq, nkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        qkv = self.fused[i].qkv
        if qkv is not None:  # one GEMV for q, k and v, one RoPE over the q and k heads
            qk, v = F.linear(x, qkv).split([(nq + nkv) * d, nkv * d], dim=-1)
            qk = apply_rope(qk.view(b, s, nq + nkv, d).transpose(1, 2), cos, sin)  # [B, N + N_kv, S, D]
            q, k = qk.split([nq, nkv], dim=1)  # [B, N, S, D], [B, N_kv, S, D]
        else:
            q = apply_rope(attn.q_proj(x).view(b, s, nq, d).transpose(1, 2), cos, sin)  # [B, N, S, D]
            k = apply_rope(attn.k_proj(x).view(b, s, nkv, d).transpose(1, 2), cos, sin)  # [B, N_kv, S, D]
            v = attn.v_proj(x)
        return q, k, v.view(b, s, nkv, d).transpose(1, 2)

    def _attention(self, i, attn, x, cos, sin, allowed, cols, prefill: bool):
        """x [B, S, H]; writes this call's K/V at columns cols [S] of the static cache. Keys: all M columns at
        decode (allowed [B, 1, 1, M], additive); at prefill (cols = [0, S)) only the S prompt columns, causally
        (allowed None) or under the padding-and-causal mask allowed [B, 1, S, S]."""
        b, s, _ = x.shape
        k_cache, v_cache = self.k_cache[i][:b], self.v_cache[i][:b]  # [B, N_kv, M, D] views
        qkv = self.fused[i].qkv
        if self.rope_kernel and not prefill and qkv is not None:  # one token per row: one kernel after the GEMV
            # the whole cache and cos/sin [B, 1, D] are passed, not views of them: inductor copies a view that a
            # user Triton kernel writes (or reads) into a temporary and back, two copies of the cache per layer
            q = rope_qkv_into_cache(F.linear(x.view(b, -1), qkv), cos, sin, self.k_cache[i], self.v_cache[i], cols,
                                    attn.num_heads, attn.num_kv_heads)  # [B, N, 1, D]
            keys, values = k_cache, v_cache
        else:
            q, k, v = self._qkv(i, attn, x, cos, sin)
            k_cache.index_copy_(2, cols, k)
            v_cache.index_copy_(2, cols, v)
            keys, values = (k, v) if prefill else (k_cache, v_cache)  # prefill: this call's columns [0, S)
        n_rep = attn.num_heads // attn.num_kv_heads
        out = F.scaled_dot_product_attention(q, repeat_kv(keys, n_rep), repeat_kv(values, n_rep), attn_mask=allowed,
                                             is_causal=allowed is None, scale=attn.scale)  # [B, N, S, D]
        return self._linear(attn.o_proj, out.transpose(1, 2).reshape(b, s, -1))

    def _linear(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """module(x), x [B, S, K]; one row of a plain nn.Linear through the Triton GEMV when dense_gemv is on."""
        if self.dense_gemv and x.shape[0] * x.shape[1] == 1 and _plain_linear(module):
            return linear_gemv(x.reshape(1, -1), module.weight, self.gemv_tiles).view(*x.shape[:-1], -1)
        return module(x)

    def _moe(self, mlp, x, token_mask, prefill: bool):
        """x [B, S, H] -> [B, S, H], dropless."""
        t = x.reshape(-1, x.shape[-1])  # [T, H]
        if prefill:
            grouped = HAS_GROUPED_MM and (self.moe_impl == "grouped" or
                                          (self.moe_impl in ("auto", "gemv") and self.grouped_ok))
            # the grouped GEMM takes device-side offsets: no host sync; the reference [E, C, H] buffer is sized by
            # the max load, read on the host
            r = route(t, mlp.gate_weight, mlp.top_k, 0.0, mlp.min_capacity, True, token_mask.reshape(-1),
                      mlp.selection_bias, mlp.router_combine, size_dropless=not grouped)
            if grouped:
                return grouped_experts(mlp.experts, t, r).view(x.shape)
            return combine(mlp.experts(dispatch(t, r, mlp.num_experts)), r, t.shape[0]).view(x.shape)
        r = decode_route(mlp, t)
        impl = pick_moe_impl(self.moe_impl, t.shape[0], mlp.top_k, mlp.num_experts, self.grouped_ok)
        if impl == "gemv":
            return expert_gemv(mlp.experts, t, r, self.gemv_tiles).view(x.shape)
        experts = {"gather": gathered_experts, "dense": dense_experts, "grouped": grouped_experts}[impl]
        return experts(mlp.experts, t, r).view(x.shape)

    def _layer(self, i, layer, h, cos, sin, allowed, cols, token_mask, prefill: bool):
        """OpenMoeDecoderLayer.forward with the static-cache attention, the dropless MoE above and fused GEMVs."""
        f = self.fused[i]
        h = h + self._attention(i, layer.self_attn, layer.input_layernorm(h), cos, sin, allowed, cols, prefill)
        if not layer.is_moe:
            return h + fused_mlp(layer.mlp, f.mlp, layer.post_attention_layernorm(h), self._linear)
        n = layer.post_attention_layernorm(h)
        m = self._moe(layer.mlp, n, token_mask, prefill)
        if layer.has_shared:
            m = m + fused_mlp(layer.shared_experts, f.shared, n, self._linear)
        h = h + m
        if layer.has_extra:
            h = h + fused_mlp(layer.extra_mlp, f.extra, layer.pre_extra_mlp_layernorm(h), self._linear)
        return h

    def _logits(self, h):
        return self.model.lm_head(self.model.model.norm(h[:, -1])).float()  # [B, V]

    @torch.no_grad()
    def _prefill(self, ids, mask, key_mask):
        """ids, mask [B, S] -> logits [B, V] of the last column; fills cache columns [0, S) and key_mask."""
        cfg, (b, s) = self.config, ids.shape
        positions = default_positions(mask, b, s, 0, ids.device)  # [B, S]
        key_mask[:b, :s] = mask.bool()  # keys the next tokens may see: real tokens and the <pad>-BOS, and the last
        key_mask[:b, s - 1] = True  # column (a padded row's query always sees itself, as in _attention_allowed)
        # host read once per request: no padding -> SDPA is_causal (flash), else the [B, 1, S, S] mask
        allowed = None if bool(mask.all()) else _attention_allowed(mask, s, 0, ids.device)
        h = self.model.model.embed_tokens(ids)  # [B, S, H]
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, h.dtype)
        cols = torch.arange(s, device=ids.device)
        for i, layer in enumerate(self.model.model.layers):
            h = self._layer(i, layer, h, cos, sin, allowed, cols, mask.bool(), prefill=True)
        return self._logits(h)

    def _decode_step(self, tokens, positions, col, key_mask):
        """One token per row: tokens, positions [B], col [1] (its cache column), key_mask [B, M] -> logits [B, V].
        Fixed shapes and no host reads: what torch.compile captures as one CUDA graph."""
        cfg = self.config
        h = self.model.model.embed_tokens(tokens[:, None])  # [B, 1, H]
        cos, sin = rope_cos_sin(positions[:, None], cfg.head_dim, cfg.rope_theta, h.dtype)  # [B, 1, D]
        columns = torch.arange(self.max_seq_len, device=tokens.device)
        allowed = decode_bias(key_mask | (columns == col), h.dtype)  # [B, 1, 1, M]: a query always sees itself
        for i, layer in enumerate(self.model.model.layers):
            h = self._layer(i, layer, h, cos, sin, allowed, col, None, prefill=False)
        return self._logits(h)

    # ------------------------------------------------------------------------------------------------ generation
    def check_request(self, batch_size: int, prompt_len: int, max_new_tokens: int) -> None:
        """ValueError when a request does not fit the static cache (it is never reallocated or grown)."""
        if batch_size > self.max_batch_size:
            raise ValueError(f"batch size ({batch_size}) exceeds the fast decoder's max_batch_size "
                             f"({self.max_batch_size}); build it with max_batch_size >= {batch_size}")
        need = prompt_len + max_new_tokens
        if need > self.max_seq_len:
            raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {need} exceeds the "
                             f"static KV cache's max_seq_len ({self.max_seq_len}); shorten the request or build the "
                             f"decoder with max_seq_len >= {need}")

    @torch.no_grad()
    def generate(
        self,
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
        """model.generate's contract: [B, S + n] ids, finished rows padded after their stop. on_tokens(tokens [B],
        finished [B], host tensors) is called once per step as in the reference, but in bursts at each host read
        (every `sync_every` steps, for the window before); all_done(local_done) is asked at those reads too, with the
        flags of the window before."""
        cfg = self.config
        eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
        b, s = input_ids.shape
        self.check_request(b, s, max_new_tokens)
        self.fuse_projections()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if cfg.pad_is_bos:  # a hidden <pad> BOS is attended, routed and counted in positions, as in the reference
            attention_mask = bos_visible_mask(input_ids, attention_mask, cfg.bos_token_id)
        st = self._start(input_ids, attention_mask, eos, stop_sequences, repetition_penalty, vocab_limit)
        logits = self._prefill(input_ids, attention_mask, st.key_mask[:b])
        st.col.fill_(s)  # token 0 goes to cache column S
        reported, ready, pending = 0, None, None
        for t in range(max_new_tokens):
            if t == 0:
                nxt = self._choose(logits, st.presence[:b], do_sample, temperature, top_k, top_p, repetition_penalty,
                                   generator, vocab_limit)
                self._advance(nxt, b)
            elif not do_sample:  # the model, the choice and the bookkeeping: one compiled step
                if self._compiled:
                    torch.compiler.cudagraph_mark_step_begin()
                self._greedy(b)
            else:  # the compiled model; the generator's draw outside the graph
                if self._compiled:
                    torch.compiler.cudagraph_mark_step_begin()
                logits = self._step(st.tokens[:b], st.positions[:b], st.col, st.key_mask[:b])
                logits = logits.clone() if self._compiled else logits  # the next replay reuses the output buffer
                self._next_column()
                nxt = self._choose(logits, st.presence[:b], do_sample, temperature, top_k, top_p,
                                   repetition_penalty, generator, vocab_limit)
                self._advance(nxt, b)
            n_run = t + 1
            if n_run % self.sync_every and n_run < max_new_tokens:
                continue
            # every sync_every steps: copy the flags (and the new tokens) to the host without waiting, and read the
            # copy taken one window earlier. Waiting for that older copy leaves the steps queued since on the GPU,
            # which a read of the current flags would drain (the GPU then idles while the host launches the next
            # step). The price: a batch that has finished runs up to one more window of steps, never reported.
            ready, pending = pending, self._snapshot(b, n_run, on_tokens is not None)
            if ready is not None and n_run < max_new_tokens:
                local_done, reported = self._read(ready, on_tokens, reported)
                if all_done(local_done) if all_done is not None else local_done:
                    break
        for snapshot in (ready, pending):  # the windows not read yet (in order; a read one is skipped)
            if snapshot is not None and snapshot[2] > reported:
                _, reported = self._read(snapshot, on_tokens, reported)
        return torch.cat([input_ids, st.out[:b, :int(st.n_steps)]], dim=1)

    def _snapshot(self, b: int, n_run: int, tokens: bool):
        """(host copies of [rows finished, steps run] and, with `tokens`, of out/done_after [B, n_run]; the event
        after which they are valid (None off CUDA); n_run). The copies go to pinned memory, not waited for."""
        st = self.state
        parts = [torch.stack([st.finished[:b].all().long(), st.n_steps])]
        if tokens:
            parts += [st.out[:b, :n_run], st.done_after[:b, :n_run]]
        if self.device.type != "cuda":
            return [p.clone() for p in parts], None, n_run
        host = [p.to("cpu", non_blocking=True) for p in parts]
        event = torch.cuda.Event()
        event.record()
        return host, event, n_run

    @staticmethod
    def _read(snapshot, on_tokens, reported: int) -> tuple[bool, int]:
        """Wait for a snapshot's copies; on_tokens for its steps since the last report that the reference would
        have run. Returns (every row finished, steps reported)."""
        host, event, n_run = snapshot
        if event is not None:
            event.synchronize()
        done, n_steps = bool(host[0][0]), int(host[0][1])
        if on_tokens is not None:
            out, done_after = host[1], host[2]
            for j in range(reported, min(n_run, n_steps)):
                on_tokens(out[:, j], done_after[:, j])
        return done, n_run

    def _start(self, input_ids, attention_mask, eos, stop_sequences, repetition_penalty, vocab_limit) -> DecodeState:
        """Reset rows [:B] of the state for a new request (a few small writes, once per request)."""
        b = input_ids.shape[0]
        stops = [list(x) for x in stop_sequences if len(x)]
        st = self.state
        width, rows = st.stops.shape[1], st.stops.shape[0]
        if stops and (max(map(len, stops)) > width or len(stops) > rows):
            # grow the table (powers of two: rare recompiles of the greedy step, whose shapes it is part of)
            width = max(width, 1 << (max(map(len, stops)) - 1).bit_length())
            rows = max(rows, 1 << (len(stops) - 1).bit_length())
            st.size_stop_table(width, rows)
        table = torch.full((rows, width), ANY_TOKEN, dtype=torch.long)  # built on the host, copied once
        for j, stop in enumerate(stops):
            table[j, width - len(stop):] = torch.tensor(stop)
        st.stops.copy_(table)
        st.stop_used.copy_(torch.arange(rows) < len(stops))
        st.tail[:b].fill_(-1)
        st.finished[:b].zero_()
        st.key_mask[:b].zero_()
        st.out[:b].fill_(self.config.pad_token_id)
        st.done_after[:b].zero_()
        st.presence[:b].zero_()
        st.presence[:b].scatter_(1, input_ids, True)
        st.count[:b].copy_(attention_mask.long().sum(1))
        st.step.fill_(0)
        st.n_steps.zero_()
        st.eos.fill_(eos)
        st.penalty.fill_(repetition_penalty)
        st.vocab_limit.fill_(self.config.vocab_size if vocab_limit is None else vocab_limit)
        return st

    def _greedy_step(self, b: int) -> None:
        """One decode step of rows [:B] with a greedy choice, reading and updating self.state in place (what
        torch.compile captures as one CUDA graph per batch size)."""
        st = self.state
        logits = self._decode_step(st.tokens[:b], st.positions[:b], st.col, st.key_mask[:b])
        self._next_column()
        self._advance(greedy_argmax(limit_logits(logits, st.presence[:b], st.penalty, st.vocab_limit)), b)

    def _next_column(self) -> None:
        self.state.step.add_(1)
        self.state.col.add_(1)

    def _advance(self, nxt: torch.Tensor, b: int) -> None:
        """Record the tokens nxt [B] chosen at step `state.step` (cache column `state.col`) and update the rows'
        positions, masks, stop checks and finished flags: the reference's per-step bookkeeping, on the device."""
        st, pad = self.state, self.config.pad_token_id
        finished = st.finished[:b].clone()
        nxt = torch.where(finished, pad, nxt)  # [B]
        valid = ~finished  # the reference's attention-mask entry for this token
        st.n_steps.add_(valid.any().long())  # the reference runs a step while any row is unfinished
        st.out[:b].index_copy_(1, st.step, nxt[:, None])
        st.presence[:b].scatter_(1, nxt[:, None], True)
        st.key_mask[:b].index_copy_(1, st.col, valid[:, None])
        st.positions[:b].copy_((st.count[:b] + valid.long() - 1).clamp(min=0))
        st.count[:b].add_(valid.long())
        tail = torch.cat([st.tail[:b, 1:], nxt[:, None]], dim=1)  # [B, L]
        st.tail[:b].copy_(tail)
        matches = (tail[:, None, :] == st.stops) | (st.stops == ANY_TOKEN)  # [B, n_stop, L]
        stopped = (matches.all(-1) & st.stop_used).any(-1)  # [B]: the new tokens end with a stop sequence
        now = finished | (nxt == st.eos) | stopped
        st.finished[:b].copy_(now)
        st.done_after[:b].index_copy_(1, st.step, now[:, None])
        st.tokens[:b].copy_(nxt)

    def _choose(self, logits, presence, do_sample, temperature, top_k, top_p, repetition_penalty, generator,
                vocab_limit):
        """logits [B, V] fp32 -> next ids [B] on the device (the reference's sampling, with the repetition penalty
        over a [B, V] presence mask instead of a growing id list: the same numbers)."""
        if vocab_limit is not None or repetition_penalty != 1.0:
            logits = limit_logits(logits, presence, repetition_penalty,
                                  logits.shape[-1] if vocab_limit is None else vocab_limit)
        if not do_sample:
            return logits.argmax(-1)
        no_ids = logits.new_empty(logits.shape[0], 0, dtype=torch.long)
        probs = process_logits(logits, no_ids, temperature, top_k, top_p, 1.0).softmax(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
