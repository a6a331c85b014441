"""MoEfication: split each dense LLaMA FFN into equal experts and train a router, without changing the weights.

    python -m openmoe.convert moefy --dense /ckpt/llama --num_experts 8 --top_k 2 --data data/sample/train.jsonl \\
        --tokenizer /ckpt/llama --output /ckpt/llama-moefied
    python -m openmoe.convert moefy ... --split random          # the baseline: experts are random neuron subsets

Shapes: N captured tokens, H hidden, I intermediate (FFN neurons), E experts, I_e = I / E neurons per expert.

After Zhang et al. 2022 ("MoEfication: Transformer Feed-forward Layers are Mixtures of Experts"), for every converted
layer (i >= moe_start_layer and (i - moe_start_layer) % moe_layer_interval == 0):
  1. capture the FFN inputs (the post-attention RMSNorm output) of the dense model on a small text set, packed into
     --seq_len blocks (no padding), at most --max_tokens tokens; the last --heldout fraction of blocks is held out;
  2. split the I neurons into E experts of exactly I / E neurons each ("balanced k-means", below);
     expert e keeps rows idx_e of gate_proj/up_proj and columns idx_e of down_proj, unchanged;
  3. train the router (gate_weight [E, H]) to pick, for each token, the k experts whose outputs carry the largest
     L2 norm: BCE-with-logits on the multi-hot top-k target, full batch Adam for --router_steps steps;
  4. report, on the held-out tokens, the relative reconstruction error ||FFN(x) - sum_{e in top-k} expert_e(x)|| /
     ||FFN(x)|| (Frobenius over tokens) of the trained router, and of the oracle top-k for reference.
The checkpoint uses router_combine "ones": a chosen expert's output is added with weight 1, so with
top_k = num_experts (and no dropping: the eval capacity factor defaults to 0) the MoE FFN is the dense FFN exactly.

Balanced k-means (our choice): neurons are clustered by their co-activation on the captured training tokens. A neuron
j is the vector of its absolute activations |silu(x W_gate[j]) * (x W_up[j])| over (up to 4096) tokens, unit-normed;
k-means with cosine similarity, and each assignment step is balanced (every cluster gets exactly I / E neurons): every
unplaced neuron proposes to its most similar cluster that still has room, each cluster accepts its most similar
proposers up to its room, repeat (at most E rounds: each round places everyone or fills a cluster). Neurons that fire
together then sit in the same expert, so a few experts carry most of a token's FFN output. Weight-row clustering
(MoEfication's "parameter split") needs no data but reconstructs worse when the data is at hand.

The export carries --tokenizer when that is a directory, else the dense directory's tokenizer; an existing non-empty
--output needs --overwrite (convert/output.py).
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from openmoe.convert.output import check_output, no_tokenizer_note, source_tokenizer
from openmoe.convert.t5x import parse_size
from openmoe.convert.upcycle import (
    add_moe_arguments,
    build_moe_state_dict,
    dense_ffn,
    llama_moe_config,
    moe_fields,
    read_llama_config,
    read_llama_weights,
    write_streamed,
)
from openmoe.io.hf import parse_dtype

SPLITS = ("balanced_kmeans", "random")


# --- data -> token blocks ---
def read_texts(path: str) -> list:
    """.txt: one text per non-empty line. .json/.jsonl: records with "text", "prompt" (+ "completion") or
    "input_ids" (token ids, used as they are)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data {path} does not exist")
    with open(path) as f:
        if path.endswith(".txt"):
            return [line.rstrip("\n") for line in f if line.strip()]
        raw = f.read()
    records = json.loads(raw) if path.endswith(".json") else [json.loads(x) for x in raw.splitlines() if x.strip()]
    out = []
    for n, r in enumerate(records):
        if "input_ids" in r:
            out.append([int(t) for t in r["input_ids"]])
        elif "text" in r:
            out.append(r["text"])
        elif "prompt" in r:
            out.append(r["prompt"] + r.get("completion", ""))
        else:
            raise ValueError(f"--data {path} record {n} has none of the fields 'text', 'prompt', 'input_ids': "
                             f"{sorted(r)}")
    return out


def load_any_tokenizer(path: str):
    """A local HF tokenizer directory or a sentencepiece .model file (nothing is fetched)."""
    from transformers import AutoTokenizer

    if path.endswith(".model"):
        from openmoe.data import load_tokenizer

        return load_tokenizer(path)
    has_sp = any(os.path.isfile(os.path.join(path, n)) for n in ("spiece.model", "tokenizer.model"))
    return AutoTokenizer.from_pretrained(path, use_fast=not has_sp)


def token_blocks(texts: list, tokenizer, seq_len: int, max_tokens: int, vocab_size: int) -> torch.Tensor:
    """[num_blocks, seq_len] ids: every text tokenised with the tokenizer's own special tokens, concatenated."""
    stream: list[int] = []
    for t in texts:
        if isinstance(t, str):
            if tokenizer is None:
                raise ValueError("--data holds text: give --tokenizer (a tokenizer directory or .model file)")
            t = tokenizer(t).input_ids
        stream.extend(t)
        if len(stream) >= max_tokens:
            break
    n = min(len(stream), max_tokens) // seq_len
    if n < 2:
        raise ValueError(f"--data gives {len(stream)} tokens: fewer than two --seq_len {seq_len} blocks (one to "
                         "train the routers, one held out); lower --seq_len or give more text")
    ids = torch.tensor(stream[: n * seq_len]).view(n, seq_len)
    if int(ids.max()) >= vocab_size:
        raise ValueError(f"token id {int(ids.max())} >= the model's vocab_size {vocab_size}: wrong tokenizer?")
    return ids


@torch.no_grad()
def capture_ffn_inputs(dense: str, layers: list[int], blocks: torch.Tensor, device: str) -> dict[int, torch.Tensor]:
    """{layer: [N, H] fp32}: the input of each listed layer's FFN in the dense HF model (a pre-hook on `mlp`)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(dense, torch_dtype=torch.float32).to(device).eval()
    captured: dict[int, list] = {i: [] for i in layers}
    hooks = [model.model.layers[i].mlp.register_forward_pre_hook(
        lambda mod, args, i=i: captured[i].append(args[0].reshape(-1, args[0].shape[-1]).float().cpu()))
        for i in layers]
    try:
        for batch in blocks.split(max(1, 8192 // blocks.shape[1])):  # ~8k tokens per forward
            model.model(batch.to(device))  # the decoder only: no LM head needed
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(xs) for i, xs in captured.items()}


# --- the split ---
def neuron_activations(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[N, I]: silu(x W_gate^T) * (x W_up^T), the FFN's intermediate activations."""
    return F.silu(x @ gate.t()) * (x @ up.t())


def balanced_assign(sim: torch.Tensor, size: int) -> torch.Tensor:
    """[n, k] similarities -> [n] cluster ids, exactly `size` = n / k per cluster (proposal rounds, docstring)."""
    n, k = sim.shape
    assign = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((k,), size, dtype=torch.long)
    while (assign < 0).any():
        free = (assign < 0).nonzero().squeeze(1)
        s = sim[free].masked_fill((room == 0)[None, :], float("-inf"))
        choice = s.argmax(dim=1)
        for c in choice.unique().tolist():
            proposers = free[choice == c]
            take = proposers[sim[proposers, c].argsort(descending=True)[: int(room[c])]]
            assign[take] = c
            room[c] -= take.numel()
    return assign


def balanced_kmeans(points: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """[n, d] points -> [n] cluster ids with n / k points each; cosine k-means with balanced assignment steps."""
    n = points.shape[0]
    p = F.normalize(points.float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    centroids = p[torch.randperm(n, generator=g)[:k]]
    assign = balanced_assign(p @ centroids.t(), n // k)
    for _ in range(iters):
        centroids = F.normalize(torch.zeros(k, p.shape[1]).index_add_(0, assign, p), dim=1)
        new = balanced_assign(p @ centroids.t(), n // k)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


def split_neurons(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, num_experts: int, split: str,
                  seed: int) -> torch.Tensor:
    """[E, I_e] neuron indices of each expert (sorted within an expert)."""
    i = gate.shape[0]
    if split == "random":
        assign = torch.randperm(i, generator=torch.Generator().manual_seed(seed)) % num_experts
    else:
        sample = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:4096]]
        assign = balanced_kmeans(neuron_activations(sample, gate, up).abs().t(), num_experts, seed=seed)
    return torch.stack([(assign == e).nonzero().squeeze(1) for e in range(num_experts)])  # [E, I_e]


def expert_outputs(x: torch.Tensor, gate, up, down, groups: torch.Tensor) -> torch.Tensor:
    """[E, N, H]: each expert's output on x [N, H] (its neurons' share of the dense FFN output)."""
    a = neuron_activations(x, gate, up)  # [N, I]
    return torch.stack([a[:, idx] @ down[:, idx].t() for idx in groups])


# --- the router ---
def train_router(x: torch.Tensor, targets: torch.Tensor, steps: int, lr: float, seed: int) -> torch.Tensor:
    """gate_weight [E, H]: BCE-with-logits of x @ W^T against the multi-hot targets [N, E]."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(targets.shape[1], x.shape[1], generator=g) * 0.01).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(x @ w.t(), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach()


def topk_targets(outs: torch.Tensor, k: int) -> torch.Tensor:
    """[E, N, H] expert outputs -> [N, E] multi-hot of the k experts with the largest output norm."""
    norms = outs.norm(dim=-1).t()  # [N, E]
    return torch.zeros_like(norms).scatter_(1, norms.topk(k, dim=1).indices, 1.0)


def reconstruction_error(outs: torch.Tensor, chosen: torch.Tensor) -> float:
    """||sum_e outs_e - sum_{e chosen} outs_e|| / ||sum_e outs_e||; outs [E, N, H], chosen [N, E] 0/1."""
    full = outs.sum(0)
    approx = (outs * chosen.t()[..., None]).sum(0)
    return float((full - approx).norm() / full.norm().clamp(min=1e-30))


def moefy_layer(x_train, x_held, gate, up, down, num_experts, top_k, split, steps, lr, seed):
    """(wi_gate [E, H, I_e], wi_up [E, H, I_e], wo [E, I_e, H], gate_weight [E, H], report dict)."""
    groups = split_neurons(x_train, gate, up, num_experts, split, seed)
    router = train_router(x_train, topk_targets(expert_outputs(x_train, gate, up, down, groups), top_k),
                          steps, lr, seed)
    held = expert_outputs(x_held, gate, up, down, groups)
    picked = torch.zeros(x_held.shape[0], num_experts).scatter_(1, (x_held @ router.t()).topk(top_k, 1).indices, 1.0)
    report = {"heldout_error": reconstruction_error(held, picked),
              "oracle_error": reconstruction_error(held, topk_targets(held, top_k)),
              "router_accuracy": float((picked * topk_targets(held, top_k)).sum() / picked.sum())}
    experts = (torch.stack([gate[idx].t() for idx in groups]), torch.stack([up[idx].t() for idx in groups]),
               torch.stack([down[:, idx].t() for idx in groups]))
    return (*experts, router, report)


def moefy(dense: str, output: str, num_experts: int, top_k: int, data: str, tokenizer: str | None = None,
          moe_start_layer: int = 0, moe_layer_interval: int = 1, split: str = "balanced_kmeans", seq_len: int = 128,
          max_tokens: int = 65536, heldout: float = 0.1, router_steps: int = 300, router_lr: float = 1e-2,
          seed: int = 0, dtype: str | None = None, device: str = "cpu", max_shard_bytes: int = 2 * 10**9,
          overwrite: bool = False, **fields) -> dict:
    """Convert; returns {"layers": {i: {heldout_error, oracle_error, router_accuracy}}, "mean_heldout_error"}.
    overwrite: replace an existing non-empty `output`."""
    if split not in SPLITS:
        raise ValueError(f"--split '{split}' is not supported; accepted: {list(SPLITS)}")
    check_output(output, overwrite, (dense, data, tokenizer))
    hf = read_llama_config(dense)
    if hf.intermediate_size % num_experts:
        raise ValueError(f"intermediate_size ({hf.intermediate_size}) must be divisible by num_experts "
                         f"({num_experts}): every expert gets intermediate_size / num_experts neurons")
    fields = {"router_combine": "ones", "router_capacity_factor_eval": 0.0, **fields}
    config = llama_moe_config(hf, num_experts=num_experts, top_k=top_k, moe_start_layer=moe_start_layer,
                              moe_layer_interval=moe_layer_interval,
                              moe_intermediate_size=hf.intermediate_size // num_experts, **fields)
    layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    # a sentencepiece .model file tokenizes the data only: a llama_moe export needs a tokenizer directory
    tok = source_tokenizer(config, dense, tokenizer if tokenizer and os.path.isdir(tokenizer) else None)
    blocks = token_blocks(read_texts(data), load_any_tokenizer(tokenizer) if tokenizer else None, seq_len,
                          max_tokens, config.vocab_size)
    n_held = max(1, round(heldout * blocks.shape[0]))
    n_train_tokens = (blocks.shape[0] - n_held) * seq_len
    states = capture_ffn_inputs(dense, layers, blocks, device)

    sd = read_llama_weights(dense, hf)
    out_dtype = parse_dtype(dtype) or sd["model.embed_tokens.weight"].dtype
    built, report = {}, {}
    for i in layers:
        gate, up, down = (w.float() for w in dense_ffn(sd, i))
        x = states.pop(i)
        *experts, router, report[i] = moefy_layer(x[:n_train_tokens], x[n_train_tokens:], gate, up, down,
                                                  num_experts, top_k, split, router_steps, router_lr, seed)
        built[i] = ([w.to(out_dtype) for w in experts], router.to(out_dtype))
        print(f"layer {i}: held-out relative error {report[i]['heldout_error']:.4f} (oracle top-{top_k} "
              f"{report[i]['oracle_error']:.4f}, router picks {report[i]['router_accuracy']:.1%} of the oracle's)")
    sd = {k: v.to(out_dtype) for k, v in sd.items()}
    sd = build_moe_state_dict(sd, config, lambda i, *ffn: built[i][0], lambda i: built[i][1], dense)
    write_streamed(output, config, sd, max_shard_bytes, tok)
    mean = sum(r["heldout_error"] for r in report.values()) / len(report)
    print(f"moefied {dense} -> {output}: MoE layers {layers}, {num_experts} experts of "
          f"{config.expert_intermediate_size} neurons, top-{top_k}, split '{split}', "
          f"{n_train_tokens} train / {n_held * seq_len} held-out tokens, mean held-out error {mean:.4f}")
    if tok is None:
        print(no_tokenizer_note(output, dense, "--dense"))
    return {"layers": report, "mean_heldout_error": mean}


# --- CLI ---
def add_parser(subparsers) -> None:
    p = subparsers.add_parser("moefy", help="dense HF LLaMA -> llama_moe by splitting each FFN into experts "
                                            "(MoEfication) and training routers on sample text",
                              description=__doc__.split("\n\n")[0])
    add_moe_arguments(p, default_combine="ones")
    p.add_argument("--data", required=True, help=".txt (a text per line) or .json/.jsonl records with 'text', "
                                                 "'prompt'[+'completion'] or 'input_ids'")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or sentencepiece .model for text data; a "
                                                     "directory is also written into the export (default there: the "
                                                     "--dense directory's own)")
    p.add_argument("--split", choices=SPLITS, default="balanced_kmeans",
                   help="how neurons are grouped into experts (random: the baseline)")
    p.add_argument("--seq_len", type=int, default=128, help="tokens per captured block")
    p.add_argument("--max_tokens", type=int, default=65536, help="tokens captured at most")
    p.add_argument("--heldout", type=float, default=0.1, help="fraction of blocks held out for the error report")
    p.add_argument("--router_steps", type=int, default=300)
    p.add_argument("--router_lr", type=float, default=1e-2)
    p.add_argument("--device", default="cpu", help="device of the dense model while capturing")
    p.set_defaults(func=_run)


def _run(args) -> None:
    moefy(args.dense, args.output, args.num_experts, args.top_k, args.data, args.tokenizer, args.moe_start_layer,
          args.moe_layer_interval, args.split, args.seq_len, args.max_tokens, args.heldout, args.router_steps,
          args.router_lr, args.seed, args.dtype, args.device, parse_size(args.max_shard_size), args.overwrite,
          **moe_fields(args))
