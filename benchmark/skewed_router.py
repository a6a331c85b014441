"""Write a random-init OpenMoE checkpoint whose routers send most tokens to the first experts (EP rank 0 of 2):
the skewed-load case that expert placement rebalancing (--load_balance) is for.

    python3 benchmark/skewed_router.py --model base --out /tmp/skewed-base [--experts 8 --tilt 2.0]

Each MoE layer's gate rows 0..experts-1 are tilted towards the mean router input of the shipped sample data (as the
2-rank test in tests/parallel/test_load_balance_dist.py does for the tiny model), measured with the model itself.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from openmoe.config import preset  # noqa: E402
from openmoe.model import OpenMoeForCausalLM  # noqa: E402
from openmoe.moe import OpenMoeSparseMLP  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="base")
    p.add_argument("--out", required=True)
    p.add_argument("--experts", type=int, default=None, help="tilted experts (default: the first half)")
    p.add_argument("--tilt", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args()
    from openmoe import data  # here: tilt_routers (also used by train_bench) needs no data loading
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(a.seed)
    model = OpenMoeForCausalLM(preset(a.model)).to(device)
    tokenizer = data.load_tokenizer("tests/assets/tokenizer")
    records = data.load_records("data/sample/train.jsonl").select(range(32))
    batch = {k: v.to(device) for k, v in data.collate(data.tokenize_examples(records, tokenizer, 256), 0, 256).items()}
    n = a.experts or model.config.num_experts // 2
    share = tilt_routers(model, batch, n, a.tilt)
    model.save_pretrained(a.out)
    print(f"wrote {a.out}: share of router choices on experts 0..{n - 1} per MoE layer: "
          + " ".join(f"{float(s):.2f}" for s in share))


def tilt_routers(model, batch: dict, n: int, tilt: float) -> torch.Tensor:
    """Tilt every MoE layer's gate rows 0..n-1 towards the mean router input of `batch` (real tokens), layer by layer
    in order (each tilt changes what later layers see). Returns the share of router choices on experts 0..n-1 per MoE
    layer afterwards. Also benchmark/train_bench.py --skew_router."""
    layers = [m for m in model.modules() if isinstance(m, OpenMoeSparseMLP)]
    with torch.no_grad():
        for layer in layers:
            seen = []
            hook = layer.register_forward_pre_hook(lambda m, args: seen.append(_real_tokens(args).float()))
            model(**batch)
            hook.remove()
            mean = seen[0].mean(0)
            layer.gate_weight[:n] += (tilt * mean / mean.norm() ** 2).to(layer.gate_weight.dtype)
        return torch.stack([m.route(x, None).tokens_per_expert[:n].sum() / (x.shape[0] * m.top_k)
                            for m, x in zip(layers, _router_inputs(model, layers, batch))])


def _real_tokens(args) -> torch.Tensor:
    """[N, H] router inputs of real tokens from an MoE layer's forward arguments (hidden, token_mask or None)."""
    hidden, mask = args[0], args[1] if len(args) > 1 else None
    return hidden.reshape(-1, hidden.shape[-1]) if mask is None else hidden[mask.bool()]


def _router_inputs(model, layers, batch):
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(_real_tokens(args))) for m in layers]
    model(**batch)
    for h in hooks:
        h.remove()
    return [x.reshape(-1, x.shape[-1]) for x in seen]


if __name__ == "__main__":
    main()
