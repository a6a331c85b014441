"""Chunked all-to-all / expert pipeline of the capacity-mode expert-parallel layer (`comm_overlap=N` chunks).
Shapes: P ranks in the EP group, E_l local experts, C capacity, c capacity slots of one chunk, H hidden,
I intermediate, n = P*c rows per local expert in one chunk.

The dispatch buffer [P, E_l, C, H] is cut along C into N chunks (sizes differ by at most one, so any C works; with
C < N there are C chunks of one slot). Rows are independent through the experts, so each chunk is a complete
dispatch -> experts -> combine and the chunks can be pipelined:

  forward:  send all N dispatch chunks at once (async), then for each chunk i: wait for dispatch i, run the experts
            on it, send its combine (async). Expert compute of chunk i overlaps the dispatch of chunks > i and the
            combine of chunks < i; the comm queue never waits for compute until the combines.
  backward: the same pipeline on gradients, in one custom autograd Function so that the order is ours and not the
            autograd engine's: send all N output-gradient chunks (the reverse of combine) at once, then for each
            chunk i: wait, expert backward of chunk i, send its input gradient (the reverse of dispatch) async.
            Expert backward of chunk i overlaps the gradient all-to-alls of the other chunks.

Equal splits make an all-to-all its own adjoint, so forward and backward use the same collective.
The expert backward is written out (SwiGLU MLP: three batched matmuls) instead of calling autograd on a graph built
inside forward: under non-reentrant activation checkpointing a nested `autograd.grad` per chunk would be a new graph
task and recompute the whole decoder layer (collectives included) once per chunk. Here the saved activations
(x, x @ wi_gate, x @ wi_up per chunk) go through `save_for_backward`, so checkpointing frees and recomputes them like
any other op. Results equal the plain path up to floating-point reordering (tests/parallel/test_overlap.py).

Host syncs: none added. Chunk bounds are Python ints from C, which the router computes from the batch shape. With
NCCL, `work.wait()` makes the current CUDA stream wait for the collective (the host runs on); with gloo it blocks the
calling thread until the collective has finished (gloo runs collectives on its own worker threads, so CPU compute
still overlaps).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from openmoe.moe import OpenMoeExperts, swiglu


def chunk_bounds(capacity: int, num_chunks: int) -> list[tuple[int, int]]:
    """[lo, hi) capacity ranges of min(num_chunks, capacity) chunks whose sizes differ by at most one."""
    n = min(num_chunks, capacity)
    size, extra = divmod(capacity, n)
    bounds, lo = [], 0
    for i in range(n):
        hi = lo + size + (i < extra)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def _start_all_to_all(send: torch.Tensor, group):
    """Launch an equal-split all-to-all of `send` [P, ...] (contiguous); returns (work, recv, send). Keep `send`
    referenced until the wait: the collective reads it asynchronously."""
    recv = torch.empty_like(send)
    work = dist.all_to_all_single(recv, send, group=group, async_op=True)
    return work, recv, send


def _to_experts(recv: torch.Tensor) -> torch.Tensor:
    """[P(source), E_l, c, H] -> [E_l, P*c, H]: one batch of rows per local expert."""
    p, el, c, h = recv.shape
    return recv.transpose(0, 1).reshape(el, p * c, h)


def _from_experts(y: torch.Tensor, p: int) -> torch.Tensor:
    """[E_l, P*c, H] -> [P(destination), E_l, c, H], contiguous for the all-to-all."""
    el, n, h = y.shape
    return y.view(el, p, n // p, h).transpose(0, 1).contiguous()


def _experts_forward(x, wi_gate, wi_up, wo):
    """OpenMoeExperts.forward on x [E_l, n, H]; also returns what the hand-written backward needs."""
    gate = torch.bmm(x, wi_gate)  # [E_l, n, 2I]
    up = torch.bmm(x, wi_up)  # [E_l, n, I]
    return torch.bmm(swiglu(gate) * up, wo), (x, gate, up)  # [E_l, n, H]


def _experts_backward(saved, wi_gate, wi_up, wo, grad_y, need_weight_grads: bool):
    """Gradients of `_experts_forward` w.r.t. x and the three weights; grad_y [E_l, n, H]."""
    x, gate, up = saved
    a, b = gate.chunk(2, dim=-1)  # swiglu(gate) = a * silu(b)
    silu_b = F.silu(b)
    act = a * silu_b  # [E_l, n, I]
    grad_h = torch.bmm(grad_y, wo.transpose(1, 2))  # [E_l, n, I]
    grad_act, grad_up = grad_h * up, grad_h * act
    grad_gate = torch.cat([grad_act * silu_b, torch.ops.aten.silu_backward(grad_act * a, b)], dim=-1)  # [E_l, n, 2I]
    grad_x = torch.baddbmm(torch.bmm(grad_gate, wi_gate.transpose(1, 2)), grad_up, wi_up.transpose(1, 2))
    if not need_weight_grads:
        return grad_x, None
    xt = x.transpose(1, 2)  # [E_l, H, n]
    return grad_x, (torch.bmm(xt, grad_gate), torch.bmm(xt, grad_up), torch.bmm((act * up).transpose(1, 2), grad_y))


class _OverlappedExperts(torch.autograd.Function):
    """buf [P, E_l, C, H] (dispatch layout, rows by destination rank) -> [P, E_l, C, H] expert outputs back at the
    sending rank: dispatch all-to-all, experts, combine all-to-all, pipelined over capacity chunks (module docstring).
    Expert weight gradients are multiplied by `grad_scale` (see ExpertParallelMoE); the input gradient is not."""

    @staticmethod
    def forward(ctx, buf, wi_gate, wi_up, wo, group, bounds, grad_scale):
        p = buf.shape[0]
        dispatches = [_start_all_to_all(buf[:, :, lo:hi].contiguous(), group) for lo, hi in bounds]
        combines, saved = [], []
        for work, recv, _ in dispatches:
            work.wait()  # gloo: host blocks; NCCL: the current stream waits for dispatch i, the host does not
            y, act = _experts_forward(_to_experts(recv), wi_gate, wi_up, wo)
            saved.extend(act)
            combines.append(_start_all_to_all(_from_experts(y, p), group))
        out = torch.empty_like(buf)
        for (lo, hi), (work, back, _) in zip(bounds, combines):
            work.wait()
            out[:, :, lo:hi] = back
        ctx.save_for_backward(wi_gate, wi_up, wo, *saved)
        ctx.group, ctx.bounds, ctx.grad_scale = group, bounds, grad_scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        wi_gate, wi_up, wo, *saved = ctx.saved_tensors
        p, need_w = grad_out.shape[0], any(ctx.needs_input_grad[1:4])
        # reverse of combine: output gradients go back to the ranks that ran the experts
        grads = [_start_all_to_all(grad_out[:, :, lo:hi].contiguous(), ctx.group) for lo, hi in ctx.bounds]
        returns, weight_grads = [], None
        for i, (work, grad_recv, _) in enumerate(grads):
            work.wait()
            grad_x, wg = _experts_backward(saved[3 * i : 3 * i + 3], wi_gate, wi_up, wo, _to_experts(grad_recv),
                                           need_w)
            # reverse of dispatch: input gradients go back to the ranks that sent the tokens
            returns.append(_start_all_to_all(_from_experts(grad_x, p), ctx.group))
            if need_w:
                weight_grads = wg if weight_grads is None else [acc.add_(g) for acc, g in zip(weight_grads, wg)]
        grad_buf = torch.empty_like(grad_out)
        for (lo, hi), (work, back, _) in zip(ctx.bounds, returns):
            work.wait()
            grad_buf[:, :, lo:hi] = back
        gw = [None] * 3 if weight_grads is None else [g.mul_(ctx.grad_scale) for g in weight_grads]
        return grad_buf, *gw, None, None, None


def overlapped_experts(buf: torch.Tensor, experts: OpenMoeExperts, group, num_chunks: int,
                       grad_scale: float) -> torch.Tensor:
    """Dispatch all-to-all + local experts + combine all-to-all on buf [P, E_l, C, H], pipelined over
    `num_chunks` capacity chunks; returns [P, E_l, C, H]: row (j, e, s) is expert j*E_l+e's output for slot s."""
    bounds = chunk_bounds(buf.shape[2], num_chunks)
    return _OverlappedExperts.apply(buf, experts.wi_gate, experts.wi_up, experts.wo, group, bounds, grad_scale)
