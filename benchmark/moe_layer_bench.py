"""One MoE layer, forward + backward: model TFLOP/s of each expert implementation vs a dense layer of equal FLOPs,
and the plain bf16 GEMM peak. Single process, one GPU (CPU works at tiny shapes, for the tests).

    CUDA_VISIBLE_DEVICES=0 python3 benchmark/moe_layer_bench.py --model 8b --tokens 8192 --out outputs/bench

Layer: OpenMoeSparseMLP of the preset (8b: H 2048, expert width I 8192 with a 2I-wide gate, 32 experts, top-2, train
capacity factor 1.25), bf16, training mode, initialised as the model does; input: random hidden states [T, H] ~ N(0, 1)
and a random output gradient. Routing is real: the router scores these hidden states and drops what exceeds capacity.
Implementations: "bmm" (capacity buffer [E, C, H], batched matmuls; pads to C rows per expert), "grouped"
(torch._grouped_mm over the kept tokens sorted by expert), "grouped-dropless" (every token routed), "naive" (the
baseline-(b) layer of benchmark/naive_moe.py: dense [T, E, C] dispatch/combine einsums and a loop over experts).
Model FLOPs of the layer = 6 * T * (E * H router + top_k * expert weights) (benchmark/flops.py conventions: padding
and drops not counted). Dense equivalent: one gated MLP of width top_k * I (the same matmuls as if each token's
top_k experts were one dense MLP), 6 * T * top_k * expert weights FLOPs, so "vs dense" = MoE TFLOP/s / dense TFLOP/s
(the router's share of the MoE FLOPs is E*H / (top_k * expert weights), 0.05% at 8B).
Writes OUT/NAME.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmark import timing  # noqa: E402
from benchmark.naive_moe import NaiveSparseMLP  # noqa: E402
from openmoe.config import preset  # noqa: E402
from openmoe.moe import HAS_GROUPED_MM, OpenMoeSparseMLP  # noqa: E402
from openmoe.router import capacity  # noqa: E402

IMPLS = ("bmm", "grouped", "grouped-dropless", "naive")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="8b")
    p.add_argument("--tokens", type=int, default=8192, help="T: tokens through the layer (micro-batch 4 x 2048)")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--gemm_n", type=int, default=8192, help="GEMM peak: n x n x n bf16 matmul")
    p.add_argument("--name", default="micro-moe-layer")
    p.add_argument("--out", default=os.environ.get("OUT", "outputs/bench"))
    return p.parse_args(argv)


@torch.no_grad()
def init_like_model(layer: OpenMoeSparseMLP, num_layers: int, std: float) -> None:
    """OpenMoeForCausalLM.reset_parameters for these tensors: N(0, std), output projection std / sqrt(2 L)."""
    layer.gate_weight.normal_(0.0, std)
    layer.experts.wi_gate.normal_(0.0, std)
    layer.experts.wi_up.normal_(0.0, std)
    layer.experts.wo.normal_(0.0, std / math.sqrt(2 * num_layers))


def fwd_bwd(module, x, grad):
    """One forward + backward; returns the MoeAux of an MoE layer (None for the dense layer)."""
    x.grad = None
    module.zero_grad(set_to_none=True)
    out = module(x)
    aux = None
    if isinstance(out, tuple):
        out, aux = out
    out.backward(grad)
    return aux


class DenseEquivalent(torch.nn.Module):
    """A dense gated MLP of width top_k * I with the experts' structure (one expert of k times the width)."""

    def __init__(self, experts_cls, hidden: int, width: int):
        super().__init__()
        self.mlp = experts_cls(1, hidden, width)

    def forward(self, x):
        return self.mlp.forward_one(0, x)


def measure(name, module, x, grad, device, a, flops, hw_flops=None) -> dict:
    row = {"impl": name}
    try:
        timing.reset_peak_memory(device)
        state = {}
        times = timing.timed(lambda: state.update(aux=fwd_bwd(module, x, grad)), device, a.iters, a.warmup)
        t = timing.median(times)
        row.update(ms=1e3 * t, model_tflops=flops / t / 1e12, peak_mem_gib=timing.peak_memory_gib(device)[0])
        if hw_flops is not None:
            row["hw_tflops"] = hw_flops / t / 1e12
        aux = state["aux"]
        if aux is not None:
            counts = aux.tokens_per_expert.float()
            row.update(dropped_fraction=float(aux.dropped_fraction),
                       max_over_mean_load=float(counts.max() / counts.mean()))
    except Exception as e:  # one implementation failing (e.g. OOM) must not hide the others
        row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    a = parse_args(argv)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16
    cfg = preset(a.model)
    h, i, e, k, t = cfg.hidden_size, cfg.expert_intermediate_size, cfg.num_experts, cfg.router_topk, a.tokens
    torch.manual_seed(0)
    gemm = timing.gemm_peak_tflops(device, a.gemm_n)
    with device:
        layer = OpenMoeSparseMLP(cfg).to(dtype).train()
        init_like_model(layer, cfg.num_hidden_layers, cfg.initializer_range)
        x = torch.randn(t, h, dtype=dtype).requires_grad_()
        grad = torch.randn(t, h, dtype=dtype)
        dense = DenseEquivalent(type(layer.experts), h, k * i).to(dtype)
        torch.nn.init.normal_(dense.mlp.wi_gate, 0.0, 0.02)
        torch.nn.init.normal_(dense.mlp.wi_up, 0.0, 0.02)
        torch.nn.init.normal_(dense.mlp.wo, 0.0, 0.02)
    per_expert = sum(p[0].numel() for p in layer.experts.parameters())  # weights of one expert
    moe_flops = 6 * t * (e * h + k * per_expert)
    dense_flops = 6 * t * k * per_expert
    rows = [measure("dense-equivalent", dense, x, grad, device, a, dense_flops)]
    dense_tflops = rows[0].get("model_tflops")
    for impl in a.impls:
        if impl.startswith("grouped") and not HAS_GROUPED_MM:
            rows.append({"impl": impl, "error": f"torch {torch.__version__} has no torch._grouped_mm"})
            continue
        if impl == "naive":
            module = NaiveSparseMLP.from_sparse(layer)
        else:
            module = layer
            layer.expert_impl = "bmm" if impl == "bmm" else "grouped"
            layer.capacity_factor_train = 0.0 if impl.endswith("dropless") else cfg.router_capacity_factor_train
        # bmm and naive compute every one of the E * C capacity slots (hardware FLOPs; C from the train factor)
        cap = capacity(t, e, k, cfg.router_capacity_factor_train, cfg.router_min_capacity)
        hw = 6 * (t * e * h + e * cap * per_expert) if impl in ("bmm", "naive") else None
        rows.append(measure(impl, module, x, grad, device, a, moe_flops, hw))
        del module
    for r in rows[1:]:
        if dense_tflops and "model_tflops" in r:
            r["vs_dense"] = r["model_tflops"] / dense_tflops
    record = {"name": a.name, "kind": "micro", "model": a.model, "tokens": t, "hidden": h, "expert_width": i,
              "experts": e, "top_k": k, "capacity_factor": cfg.router_capacity_factor_train, "dtype": str(dtype),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "gemm_peak_tflops": gemm, "gemm_n": a.gemm_n,
              "moe_model_flops": moe_flops, "dense_equivalent_flops": dense_flops,
              "routing": "real (router on random N(0,1) hidden states; not forced balanced)", "rows": rows,
              "error": None}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"{a.name}.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"GEMM peak ({a.gemm_n}^3 bf16): {gemm if gemm is None else f'{gemm:.0f} TFLOP/s'}")
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:18} error: {r['error']}")
        else:
            vs = f"{100 * r['vs_dense']:.0f}% of dense" if "vs_dense" in r else ""
            print(f"{r['impl']:18} {r['ms']:8.2f} ms  {r['model_tflops']:8.2f} TFLOP/s  {vs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
