"""Which parameters train when fine-tuning an MoE (e.g. one upcycled or MoEfied from a dense model).

Model-side piece of the trainer's `--trainable MODE --freeze_router`. Parameter groups, by state-dict name (the same
names on the single-device model and after the expert-parallel swap, which keeps `gate_weight` and `experts.*`):
  router          `*.mlp.gate_weight`
  experts         routed experts `*.mlp.experts.*` and shared experts `*.shared_experts.*`
  non_expert      everything else: embeddings, attention, norms, dense MLPs (and OpenMoE's extra MLPs), lm_head
Modes: "all" every parameter; "router" the routers only; "experts" experts + routers; "non_expert" non-expert
parameters + routers. The router belongs to every mode (a frozen router under new experts or a new attention would
route by stale features) unless freeze_router, which freezes it in any mode ("router" + freeze_router trains nothing
and is refused).
"""

from __future__ import annotations

import torch.nn as nn

TRAINABLE_MODES = ("all", "router", "experts", "non_expert")


def parameter_group(name: str) -> str:
    """"router", "experts" or "non_expert" for a parameter name."""
    if name.endswith("mlp.gate_weight"):
        return "router"
    if ".mlp.experts." in name or ".shared_experts." in name:
        return "experts"
    return "non_expert"


def trainable_parameters(model: nn.Module, mode: str = "all", freeze_router: bool = False) -> dict[str, nn.Parameter]:
    """Set requires_grad on every parameter of `model` for `mode`; return the trainable ones by name (for the
    optimizer: frozen parameters must stay out of it, or weight decay would still move them)."""
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"trainable mode '{mode}' is not supported; accepted: {list(TRAINABLE_MODES)}")
    if mode == "router" and freeze_router:
        raise ValueError("--trainable router with --freeze_router leaves nothing to train; drop one of them")
    out = {}
    for name, p in model.named_parameters():
        group = parameter_group(name)
        if group == "router":
            train = not freeze_router
        else:
            train = mode == "all" or mode == group
        p.requires_grad_(train)
        if train:
            out[name] = p
    if not out:
        raise ValueError(f"trainable mode '{mode}' (freeze_router={freeze_router}) selects no parameter of this "
                         "model (a dense model has no routers or experts)")
    return out
