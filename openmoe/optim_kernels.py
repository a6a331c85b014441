"""AdamW for lean ZeRO-1's step (openmoe/backend/colossal.py, `lean_zero1(adamw_kernel=True)`, run option
`--adamw_kernel`): one pass per parameter that reads the bf16 gradient shard itself and, where the parameter's ZeRO
group has one rank (the experts under `ep`), also writes the updated bf16 weights.

Why: torch's fused AdamW needs fp32 gradients beside fp32 masters, so the lean step first casts every bf16 shard into
an fp32 buffer (read 2 bytes, write 4, read 4 again in the kernel) and afterwards casts every master back to bf16
(read 4, write 2): per parameter 40 bytes of traffic around the 28 the update itself moves. Here: 2 + 12 read, 12 + 2
written. At OpenMoE-8B on 2 GPUs (5.9B master elements per GPU, 4.3B of them experts) that is ~70 GB less per step.

Arithmetic (fp32, that of torch's `_fused_adamw_`, ADAMW mode): g = grad / grad_scale; p -= lr * wd * p;
m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps), with t
the parameter's step count, kept as torch keeps it (a float32 tensor in optimizer.state[p]["step"], read on the
device: no host sync), so checkpoints and torch's own AdamW read the same state.

    fused_adamw_(optim, masters, grads, grad_scale, outs)   # torch.optim.AdamW; Triton on CUDA, torch ops elsewhere

The torch path (`_adamw_torch`) is the same formula in torch ops: what runs on the CPU, and what the Triton kernel is
tested against in Triton's interpreter (tests/unit/test_optim_kernels.py, which also checks both against
torch.optim.AdamW).
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU hosts: the torch path below
    HAS_TRITON = False

BLOCK = 4096  # elements per program


def check_adamw(optim) -> None:
    """ValueError naming what fused_adamw_ cannot run: it implements torch.optim.AdamW without amsgrad, maximize,
    or tensor hyperparameters, on fp32 parameters."""
    if type(optim) is not torch.optim.AdamW:
        raise ValueError(f"adamw_kernel implements torch.optim.AdamW; the optimizer is {type(optim).__name__}")
    for g in optim.param_groups:
        bad = [k for k in ("amsgrad", "maximize", "differentiable") if g.get(k)]
        bad += [k for k in ("lr", "weight_decay", "eps") if torch.is_tensor(g[k])]
        bad += ["betas (tensors)"] if any(torch.is_tensor(b) for b in g["betas"]) else []
        if bad:
            raise ValueError(f"adamw_kernel: AdamW options {bad} are not supported; accepted: float lr, betas, eps, "
                             "weight_decay, no amsgrad/maximize/differentiable")
        dtypes = sorted({str(p.dtype) for p in g["params"] if p.dtype != torch.float32})
        if dtypes:
            raise ValueError(f"adamw_kernel updates fp32 master weights; got parameters of {dtypes}")
    devices = {p.device.type for g in optim.param_groups for p in g["params"]}
    if not (devices <= {"cpu"} or (devices <= {"cpu", "cuda"} and HAS_TRITON)):
        raise ValueError(f"adamw_kernel runs a Triton kernel on CUDA (torch ops on the CPU); the parameters are on "
                         f"{sorted(devices)} and triton is {'installed' if HAS_TRITON else 'not installed'}")


def fused_adamw_(optim, masters: list[torch.Tensor], grads: list[torch.Tensor], grad_scale: float,
                 outs: dict[int, torch.Tensor] | None = None) -> None:
    """One AdamW step of `optim` (a torch.optim.AdamW holding every master in its param_groups) for `masters`, each
    with its gradient grads[i] (any float dtype, same number of elements) divided by grad_scale. outs: id(master) ->
    a tensor of the master's numel that receives the updated master in its dtype (e.g. the bf16 working weights)."""
    outs = outs or {}
    group_of = {id(p): g for g in optim.param_groups for p in g["params"]}
    steps = []
    for m in masters:
        state = optim.state[m]
        if not state:  # torch's fused AdamW initial state (the step a float32 tensor on the parameter's device)
            state["step"] = torch.zeros((), dtype=torch.float32, device=m.device)
            state["exp_avg"] = torch.zeros_like(m, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(m, memory_format=torch.preserve_format)
        steps.append(state["step"])
    torch._foreach_add_(steps, 1.0)
    for m, g in zip(masters, grads):
        group, state = group_of[id(m)], optim.state[m]
        b1, b2 = group["betas"]
        args = (m.view(-1), g.reshape(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1), state["step"],
                outs.get(id(m)), float(group["lr"]), float(b1), float(b2), float(group["eps"]),
                float(group["weight_decay"]), float(grad_scale))
        if HAS_TRITON and m.is_cuda:
            _adamw_triton(*args)
        else:
            _adamw_torch(*args)


def _adamw_torch(p, g, m, v, step, out, lr, b1, b2, eps, wd, scale) -> None:
    g = g.float() / scale
    p.mul_(1 - lr * wd)
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    bc1, bc2_sqrt = 1 - b1 ** step, (1 - b2 ** step).sqrt()
    p.sub_((lr / bc1) * m / (v.sqrt() / bc2_sqrt + eps))
    if out is not None:
        out.view(-1).copy_(p)


def _adamw_triton(p, g, m, v, step, out, lr, b1, b2, eps, wd, scale) -> None:
    n = p.numel()
    fused_out = out is not None and out.dtype == torch.bfloat16
    _adamw_kernel[(triton.cdiv(n, BLOCK),)](
        p, g, m, v, step, out if fused_out else g, n, lr, math.log(b1), math.log(b2), b1, b2, eps,
        1 - lr * wd, scale, HAS_OUT=fused_out, BLOCK=BLOCK, num_warps=8)
    if out is not None and not fused_out:  # e.g. fp16 working weights: torch's cast
        out.view(-1).copy_(p)


if HAS_TRITON:

    @triton.jit
    def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, step_ptr, out_ptr, n, lr, log_b1, log_b2, b1, b2, eps, decay,
                      scale, HAS_OUT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        t = tl.load(step_ptr)
        bc1 = 1.0 - tl.exp(t * log_b1)
        bc2_sqrt = tl.sqrt(1.0 - tl.exp(t * log_b2))
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) / scale
        p = tl.load(p_ptr + offs, mask=mask, other=0.0) * decay
        m = b1 * tl.load(m_ptr + offs, mask=mask, other=0.0) + (1.0 - b1) * g
        v = b2 * tl.load(v_ptr + offs, mask=mask, other=0.0) + (1.0 - b2) * g * g
        p = p - (lr / bc1) * m / (tl.sqrt(v) / bc2_sqrt + eps)
        tl.store(p_ptr + offs, p, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        if HAS_OUT:  # bf16, rounded to nearest even by hand (p is finite: a non-finite step never runs)
            bits = p.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            tl.store(out_ptr + offs, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
