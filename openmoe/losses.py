"""Losses as pure functions. Shapes: T tokens, E experts, K top-k, V vocabulary, H hidden.

Sources:
  * router aux (load-balancing) loss: Switch Transformer (Fedus et al. 2021, eq. 4), top-k form as in ST-MoE and
    HF Mixtral's load_balancing_loss_func.
  * sequence-wise aux loss: DeepSeek-V3 (2024, eqs. 17-20; DeepSeek-V2's expert-level loss applied per sequence).
  * router z-loss and output z-loss: ST-MoE (Zoph et al. 2022, eq. 5) and T5X/PaLM's `cross_entropy_with_logits`.
  * label smoothing: T5X `cross_entropy_with_logits` soft targets (confidence 1-ls on the label, ls/(V-1) elsewhere).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def router_aux_loss(probs: torch.Tensor, expert_idx: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e * P_e over real tokens.

    probs [T, E] fp32; expert_idx [T, K]; token_mask [T] bool.
    f_e: fraction of tokens whose top-k contains e (before capacity dropping); P_e: mean router probability of e.
    Uniform routing gives K (upstream ColossalAI divided by K; Switch with K=1 gives 1).
    """
    num_experts = probs.shape[-1]
    m = token_mask.float()
    n = m.sum().clamp(min=1)
    chosen = F.one_hot(expert_idx, num_experts).sum(dim=1).float()  # [T, E]
    f = (chosen * m[:, None]).sum(0) / n
    p = (probs * m[:, None]).sum(0) / n
    return num_experts * (f * p).sum()


def router_aux_loss_seq(probs: torch.Tensor, expert_idx: torch.Tensor, token_mask: torch.Tensor,
                        seq_len: int) -> torch.Tensor:
    """DeepSeek-style sequence-wise balance loss: mean over sequences of sum_e f_e * P_e, computed per sequence.

    probs [T, E] fp32, expert_idx [T, K], token_mask [T] bool, with T = B * seq_len tokens in row-major [B, S] order.
    Per sequence b with T_b real tokens: f_e = E / (K * T_b) * #{t: e in top-k(t)}, P_e = (1 / T_b) * sum_t p_e(t).
    Uniform routing gives 1 (the batch-level Switch form above gives K). Sequences without real tokens are skipped.
    Balancing each sequence is stricter than balancing the batch: a sequence about one topic may not load one expert.
    """
    num_experts, k = probs.shape[-1], expert_idx.shape[-1]
    m = token_mask.float().view(-1, seq_len)  # [B, S]
    n = m.sum(1)  # [B] real tokens per sequence
    chosen = F.one_hot(expert_idx, num_experts).sum(dim=1).float().view(-1, seq_len, num_experts)  # [B, S, E]
    f = (chosen * m[..., None]).sum(1) * num_experts / (k * n.clamp(min=1)[:, None])  # [B, E]
    p = (probs.view(-1, seq_len, num_experts) * m[..., None]).sum(1) / n.clamp(min=1)[:, None]  # [B, E]
    has_tokens = (n > 0).float()
    return ((f * p).sum(-1) * has_tokens).sum() / has_tokens.sum().clamp(min=1)


def router_z_loss(logits: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """mean over real tokens of logsumexp(router logits)^2. logits [T, E] fp32."""
    m = token_mask.float()
    return (logits.logsumexp(dim=-1).square() * m).sum() / m.sum().clamp(min=1)


def cross_entropy_sums(
    logits: torch.Tensor,  # [T, V]
    labels: torch.Tensor,  # [T]
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over valid tokens of (label-smoothed CE, logsumexp^2). Soft targets are FLOAT (1-ls on the label,
    ls/(V-1) elsewhere); the old ColossalAI example built them as booleans, which gave every entry weight 1.

    The T5X normalising constant (entropy of the soft targets) is not subtracted: it shifts the reported value only,
    and without it a uniform prediction reads log(V), comparable with unsmoothed CE.
    """
    if logits.element_size() < 4:  # bf16/fp16 logits: the softmax runs in fp32
        logits = logits.float()
    valid = labels != IGNORE_INDEX
    safe = labels.clamp(min=0)
    log_z = logits.logsumexp(dim=-1)  # [T]
    log_p = logits - log_z[:, None]
    nll = -log_p.gather(1, safe[:, None]).squeeze(1)
    if label_smoothing > 0:
        v = logits.shape[-1]
        low = label_smoothing / (v - 1)
        # sum_j q_j * -log p_j with q = low everywhere + (1 - ls - low) on the label
        ce = (1.0 - label_smoothing - low) * nll - low * log_p.sum(dim=-1)
    else:
        ce = nll
    zero = torch.zeros((), dtype=ce.dtype, device=ce.device)
    return torch.where(valid, ce, zero).sum(), torch.where(valid, log_z.square(), zero).sum()


def lm_loss(
    hidden: torch.Tensor,  # [B, S, H], final-normed
    lm_head_weight: torch.Tensor,  # [V, H]
    labels: torch.Tensor,  # [B, S]; position s predicts labels[s + 1] (HF convention: labels = input ids)
    label_smoothing: float,
    z_loss_factor: float,
    chunk_size: int | None = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean CE, weighted mean output z-loss, number of valid tokens).

    With chunk_size, the head and loss run over chunk_size tokens at a time under activation checkpointing, so the
    [T, V] fp32 logits (T=8192, V=256384: 8.4 GB) never exist; each chunk's logits are recomputed in backward.
    """
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # [T, H], T = B*(S-1)
    y = labels[:, 1:].reshape(-1)  # [T]
    count = (y != IGNORE_INDEX).sum()

    def chunk_sums(h_chunk, y_chunk):
        return cross_entropy_sums(F.linear(h_chunk, lm_head_weight), y_chunk, label_smoothing)

    if chunk_size is None or h.shape[0] <= chunk_size:
        ce_sum, z_sum = chunk_sums(h, y)
    else:
        ce_sum = z_sum = 0.0
        for start in range(0, h.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            if torch.is_grad_enabled():
                c, z = checkpoint(chunk_sums, h[sl], y[sl], use_reentrant=False)
            else:
                c, z = chunk_sums(h[sl], y[sl])
            ce_sum, z_sum = ce_sum + c, z_sum + z
    denom = count.clamp(min=1)
    return ce_sum / denom, z_loss_factor * z_sum / denom, count


def _ce_chunk(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float, z_loss_factor: float,
              grad_dtype: torch.dtype | None = None):
    """(CE sum, logsumexp^2 sum, d(CE sum + z_loss_factor * logsumexp^2 sum)/d logits) for one chunk; the math runs
    in fp32 (at least), the gradient is returned in grad_dtype (None: fp32). Compiled, the cast is part of the same
    kernel, so no fp32 [chunk, V] gradient is written.

    Same soft targets q as `cross_entropy_sums` (q sums to 1), so dCE/dlogits = softmax - q, and
    d(log_z^2)/dlogits = 2 log_z softmax. Padding labels (IGNORE_INDEX) contribute nothing.
    """
    lf = logits.float() if logits.element_size() < 4 else logits  # [t, V], at least fp32
    v = lf.shape[-1]
    valid = labels != IGNORE_INDEX
    safe = labels.clamp(min=0)[:, None]
    log_z = lf.logsumexp(dim=-1)  # [t]
    nll = log_z - lf.gather(1, safe).squeeze(1)
    low = label_smoothing / (v - 1) if label_smoothing > 0 else 0.0
    hit = 1.0 - label_smoothing - low if label_smoothing > 0 else 1.0
    ce = hit * nll + low * (v * log_z - lf.sum(dim=-1)) if label_smoothing > 0 else nll
    grad = (lf - log_z[:, None]).exp_().mul_((1.0 + 2.0 * z_loss_factor * log_z)[:, None])
    if low:
        grad.sub_(low)
    if torch.compiler.is_compiling():
        # The target's -hit as a select on a column comparison: Inductor fuses it with the exp above and the cast
        # below into one pass over [t, V]. A scatter_add_ into the gradient made it write the fp32 gradient, scatter,
        # then read it again to mask and cast (on an H200: 1.08 ms per 1,024 x 256k chunk, benchmark/RESULTS.md
        # "Issue 19, session 8"). In eager mode the in-place scatter allocates nothing more.
        cols = torch.arange(v, device=lf.device)
        grad = torch.where(cols[None, :] == safe, grad - hit, grad)
        grad = torch.where(valid[:, None], grad, 0.0)
    else:
        grad.scatter_add_(1, safe, torch.full_like(nll, -hit)[:, None])
        grad.mul_(valid[:, None])
    zero = torch.zeros((), dtype=ce.dtype, device=ce.device)
    grad = grad if grad_dtype is None else grad.to(grad_dtype)
    return torch.where(valid, ce, zero).sum(), torch.where(valid, log_z.square(), zero).sum(), grad


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """LM head + CE + output z-loss, chunk by chunk, with the gradient computed in the forward pass.

    Per chunk: logits = h W^T, their loss sums, the gradient g of (CE + z-loss) sums w.r.t. the logits (computed in
    fp32, returned in the weight dtype), then grad_h[chunk] = g W and grad_W += g^T h[chunk] in the weight dtype.
    Neither the [T, V] logits nor any chunk's
    logits are kept, and the head matmul is not recomputed in backward (the checkpointed `lm_loss` runs it 4 times
    per chunk, this 3). g is NOT divided by the token count before the cast: |g| <= 1 per token stays in fp16's
    normal range, where g / T (T ~ 8k) would underflow (the autograd path avoids that through the loss scale).
    Backward scales both stored gradients by (incoming gradient / T), read once as a Python float (one small host
    sync per step), so the multiply runs in fp32 per element: a device scalar would first be rounded to the
    gradient dtype (fp16 cannot hold a 65536 loss scale; bf16 would bias every element by the same rounding).
    The scaling is in place (no second copy of the [V, H] weight gradient), so this backward can run only once: a
    second backward through the same graph (retain_graph) raises instead of scaling twice.
    """

    @staticmethod
    def forward(ctx, h, weight, labels, label_smoothing, z_loss_factor, chunk_size, denom, chunk_fn):
        grad_h = torch.empty_like(h) if h.requires_grad else None
        grad_w = torch.zeros_like(weight) if weight.requires_grad else None
        ce_sum = z_sum = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        for start in range(0, h.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            c, z, g = chunk_fn(F.linear(h[sl], weight), labels[sl], label_smoothing, z_loss_factor, weight.dtype)
            ce_sum, z_sum = ce_sum + c, z_sum + z  # g: [t, V] in the weight dtype
            if grad_h is not None:
                torch.mm(g, weight, out=grad_h[sl])
            if grad_w is not None:
                grad_w.addmm_(g.t(), h[sl])
        ctx.save_for_backward(grad_h, grad_w, denom)
        ctx.spent = False
        ce, z = ce_sum / denom, z_loss_factor * z_sum / denom
        ctx.mark_non_differentiable(ce, z)
        return ce + z, ce, z

    @staticmethod
    def backward(ctx, grad_total, _ce, _z):
        if ctx.spent:
            raise RuntimeError("fused_lm_loss's backward ran twice on one graph (retain_graph); it scales its stored "
                               "gradients in place. Use lm_loss_impl 'chunked' for repeated backward passes")
        ctx.spent = True
        grad_h, grad_w, denom = ctx.saved_tensors
        scale = (grad_total.double() / denom).item()  # host sync: see the class docstring
        return (None if grad_h is None else grad_h.mul_(scale), None if grad_w is None else grad_w.mul_(scale),
                None, None, None, None, None, None)


_compiled_ce_chunk = None


def fused_lm_loss(
    hidden: torch.Tensor,  # [B, S, H], final-normed
    lm_head_weight: torch.Tensor,  # [V, H]
    labels: torch.Tensor,  # [B, S]
    label_smoothing: float,
    z_loss_factor: float,
    chunk_size: int = 1024,
    compile_chunk: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CE + weighted output z-loss, CE, weighted z-loss, number of valid tokens): `lm_loss`'s values, with the
    gradient computed in the forward pass (`_FusedLinearCrossEntropy`). Only the first value carries a gradient.

    compile_chunk: run the per-chunk softmax/gradient math through torch.compile (one fused kernel instead of a few
    passes over the [chunk, V] fp32 logits); needs a working inductor backend (triton on GPU).
    """
    global _compiled_ce_chunk
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # [T, H]
    y = labels[:, 1:].reshape(-1)  # [T]
    count = (y != IGNORE_INDEX).sum()
    chunk_fn = _ce_chunk
    if compile_chunk:
        if _compiled_ce_chunk is None:
            _compiled_ce_chunk = torch.compile(_ce_chunk, dynamic=False)
        chunk_fn = _compiled_ce_chunk
    total, ce, z = _FusedLinearCrossEntropy.apply(h, lm_head_weight, y, label_smoothing, z_loss_factor, chunk_size,
                                                  count.clamp(min=1), chunk_fn)
    return total, ce, z, count
