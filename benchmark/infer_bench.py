"""Decode throughput of OpenMoE with random weights (routing real, not forced balanced).

    python benchmark/infer_bench.py --model base --batch_sizes 1 8 --prompt_len 128 --new_tokens 128

Reports new tokens per second (batch x new tokens / wall time of generate(), prefill included) and per-token
latency, after one warm-up call. Greedy decoding with the KV cache, bf16 on GPU; the eval capacity factor routes.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from openmoe import OpenMoeForCausalLM, preset  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="base")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = OpenMoeForCausalLM(preset(a.model)).to(device=device, dtype=dtype).eval()
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    rows = []
    for b in a.batch_sizes:
        ids = torch.randint(2, min(32000, model.config.vocab_size), (b, a.prompt_len), device=device)
        ids[:, 0] = 0
        model.generate(ids, max_new_tokens=4, eos_token_id=-1)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=a.new_tokens, eos_token_id=-1)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        new = out.shape[1] - a.prompt_len
        rows.append({"model": a.model, "batch": b, "prompt_len": a.prompt_len, "new_tokens": new,
                     "tokens_per_s": b * new / dt, "ms_per_step": 1000 * dt / new, "device": name,
                     "dtype": str(dtype), "torch": torch.__version__,
                     "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None})
    print(f"{'model':6} {'batch':>5} {'tokens/s':>10} {'ms/step':>8}  device")
    for r in rows:
        print(f"{r['model']:6} {r['batch']:5d} {r['tokens_per_s']:10.1f} {r['ms_per_step']:8.2f}  {r['device']}")
    with open(os.path.join(a.out, "infer_bench.json"), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
