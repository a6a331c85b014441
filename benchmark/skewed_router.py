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

from openmoe import data  # noqa: E402
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
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(a.seed)
    model = OpenMoeForCausalLM(preset(a.model)).to(device)
    tokenizer = data.load_tokenizer("tests/assets/tokenizer")
    records = data.load_records("data/sample/train.jsonl").select(range(32))
    batch = {k: v.to(device) for k, v in data.collate(data.tokenize_examples(records, tokenizer, 256), 0, 256).items()}
    n = a.experts or model.config.num_experts // 2
    layers = [m for m in model.modules() if isinstance(m, OpenMoeSparseMLP)]
    with torch.no_grad():
        for layer in layers:  # in order: each tilt changes what later layers see
            seen = []
            hook = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0][args[1].bool()].float()))
            model(**batch)
            hook.remove()
            mean = seen[0].mean(0)
            layer.gate_weight[:n] += a.tilt * mean / mean.norm() ** 2
        share = torch.stack([m.route(x, None).tokens_per_expert[:n].sum() / (x.shape[0] * m.top_k)
                             for m, x in zip(layers, _router_inputs(model, layers, batch))])
    model.save_pretrained(a.out)
    print(f"wrote {a.out}: share of router choices on experts 0..{n - 1} per MoE layer: "
          + " ".join(f"{float(s):.2f}" for s in share))


def _router_inputs(model, layers, batch):
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0][args[1].bool()])) for m in layers]
    model(**batch)
    for h in hooks:
        h.remove()
    return [x.reshape(-1, x.shape[-1]) for x in seen]


if __name__ == "__main__":
    main()
