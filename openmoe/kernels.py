"""Optional kernels. The model keeps its reference implementations and switches to a kernel only through
`ModelOptions` (e.g. `fused_rmsnorm=True`: every RMSNorm runs NVIDIA apex's fused RMSNorm, one kernel forward and
backward, fp32 statistics like the reference). `fused_rmsnorm_kernel()` is the up-front availability check the run
config calls: apex must be installed with its CUDA extensions; there is no silent fallback.

`compile_blocks(model)` is applied from outside the model, after any expert-parallel wrapping (the trainer's
`--compile_blocks`): regional torch.compile, one region per repeated block, as torchtitan compiles each
TransformerBlock. Inductor fuses the memory-bound work between the GEMMs (RMSNorm's fp32 statistics, RoPE's
rotate-half, SwiGLU, residual adds) into a few kernels forward and backward, and keeps fewer intermediates for
backward. The regions never contain an MoE layer: its dropless all-to-all reads split sizes on the host and its
expert count varies, both graph breaks; an MoE decoder layer compiles its attention, norms and dense MLPs instead,
and its experts' gated activation act(gate) * up between their GEMMs (one region with a dynamic row count, shared
by every MoE layer of the same expert class).
The eager modules stay the reference (tests/unit/test_fast_paths.py compares losses and gradients).
"""

from __future__ import annotations

import torch

from openmoe.model import OpenMoeDecoderLayer, fused_rmsnorm_kernel
from openmoe.moe import StackedExperts

__all__ = ["compile_blocks", "fused_rmsnorm_kernel"]

# the dense submodules of an MoE decoder layer, each its own region (the MoE `mlp` between them stays eager)
_MOE_LAYER_DENSE_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "shared_experts",
                          "pre_extra_mlp_layernorm", "extra_mlp")


def compiled_gated(act, backend: str = "inductor"):
    """act(gate) * up compiled with a dynamic row count (dropless loads vary per call) and a static width.

    Only the rows are marked dynamic: `torch.compile(dynamic=True)` made the width symbolic too, and Inductor's
    kernels then index with runtime divisions and no vectorized loads. On an H200 (OpenMoE-8B experts, ~16k rows x
    16,384 gate columns) those ran 0.65 ms forward and 2.2 ms backward per call, where the dense MLP's static kernel
    moves the same bytes per row ~3x faster (benchmark/RESULTS.md, "Issue 19, session 8")."""

    def gated(gate, up):
        return act(gate) * up

    compiled = torch.compile(gated, backend=backend)

    def call(gate, up):
        torch._dynamo.maybe_mark_dynamic(gate, 0)
        torch._dynamo.maybe_mark_dynamic(up, 0)
        return compiled(gate, up)

    return call


def compile_blocks(model: torch.nn.Module) -> list[str]:
    """Compile, in place (`nn.Module.compile`: names, parameters and state-dict keys unchanged), every dense decoder
    layer whole and the dense parts of every MoE decoder layer, plus the final norm. Returns the compiled module
    names. Identical blocks share one compiled graph (parameters are graph inputs), so compile time is that of a few
    blocks, paid in the first forward and backward. `model` is an OpenMoeForCausalLM, possibly with its MoE layers
    already swapped for expert-parallel ones (a pipeline stage's model works too: layers it does not hold are never
    called, so never compiled)."""
    names, gated = [], {}  # gated: expert class -> its compiled activation, shared by its layers
    for name, module in model.named_modules():
        if not isinstance(module, OpenMoeDecoderLayer):
            continue
        if not module.is_moe:
            module.compile()
            names.append(name)
            continue
        for part in _MOE_LAYER_DENSE_PARTS:
            sub = getattr(module, part, None)
            if sub is not None:
                sub.compile()
                names.append(f"{name}.{part}")
        experts = getattr(module.mlp, "experts", None)
        if isinstance(experts, StackedExperts):
            if type(experts) not in gated:
                gated[type(experts)] = compiled_gated(type(experts).act)
            experts.gated_fn = gated[type(experts)]
            names.append(f"{name}.mlp.experts.gated")
    norm = getattr(getattr(model, "model", None), "norm", None)
    if norm is not None:
        norm.compile()
        names.append("model.norm")
    if not names:
        raise ValueError(f"compile_blocks found no OpenMoeDecoderLayer in {type(model).__name__}")
    return names
