"""One training-step gradient check of a ColossalAI plugin, launched by tests/parallel/test_plugins.py via torchrun:

    torchrun --nproc_per_node 2 tests/parallel/plugin_worker.py OUT_FILE --plugin ep [--dropless] [train.py options]
    torchrun --nproc_per_node 4 tests/parallel/plugin_worker.py OUT_FILE --plugin hybrid --pp_size 2 --ep_size 2 \
        --batch_size 3 --microbatch_size 1 --precision fp16

Builds the model, plugin and booster exactly as train.py does, runs forward/backward on a fixed global batch
(each data-parallel rank its slice of batch_size x grad_accum rows, as grad_accum accumulated micro-batches; with a
pipeline, in pipeline micro-batches) through the trainer's step, and on rank 0 saves the logged statistics, every
parameter's reduced gradient in the published single-device layout (experts gathered over their EP group, pipeline
stages merged) and how many times ZeRO-1 reduced gradients (_sync_grad calls).
"""

import os
import sys

import torch
import torch.distributed as dist

from openmoe.backend.colossal import dp_rank, grad_scaler
from openmoe.moe import OpenMoeSparseMLP
from openmoe.parallel.gather import gather_full
from openmoe.train.builder import build, build_model
from openmoe.train.config import parse_args
from openmoe.train.step import forward_backward, reduce_stats

B, S = 2, 12  # rows per data-parallel rank unless the case sets --batch_size; tokens per row
ROUTER_SCALE = 10.0
LR_CLIPPED = 1000.0


def build_test_model(run, cfg):
    """The trainer's model with router weights scaled up: at init the router is nearly uniform, so bf16 rounding
    flips near-tie top-k choices against an fp32 reference; well-separated logits make the comparison test the
    arithmetic rather than tie-breaking."""
    model = build_model(run, cfg)
    scale_router(model)
    return model


def scale_router(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, OpenMoeSparseMLP):
                m.gate_weight.mul_(ROUTER_SCALE)


def global_batch(rows: int, vocab: int) -> dict[str, torch.Tensor]:
    """`rows` BOS-first rows of S tokens; every other row ends in padding (masked out of attention, routing, loss)."""
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(2, vocab, (rows, S), generator=g)  # [rows, S]
    ids[:, 0] = 0
    mask = torch.ones_like(ids)
    mask[1::2, S - 3:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def count_calls(obj, name: str) -> list[int]:
    """Wrap obj.name to count its calls; returns the one-element counter."""
    calls, fn = [0], getattr(obj, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return fn(*args, **kwargs)

    setattr(obj, name, counted)
    return calls


def main():
    out_file, argv = sys.argv[1], sys.argv[2:]
    # > 0: one SGD step clipped to this norm, lr LR_CLIPPED so that the update dwarfs fp16/bf16 weight rounding
    clip = float(os.environ.get("OPENMOE_TEST_CLIP", "0"))
    run = parse_args(["--batch_size", str(B), *argv, "--grad_clip", str(clip or 1e9),
                      "--output_path", os.path.dirname(out_file)])
    st = build(run, training=False, customize_model=scale_router,
               make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=LR_CLIPPED if clip else 0.0))
    rank, device, cfg, sizes = st.rank, st.device, st.cfg, st.sizes
    model, optimizer, booster = st.model, st.optimizer, st.booster
    dp = dp_rank(st.boosted.plugin)
    per_rank = run.optim.batch_size * run.optim.grad_accum  # rows this rank runs in the step
    rows = slice(dp * per_rank, (dp + 1) * per_rank)
    batch = {k: v[rows].to(device) for k, v in global_batch(sizes.dp * per_rank, cfg.vocab_size).items()}
    rows_per_micro = run.optim.batch_size
    micro = [{k: v[i:i + rows_per_micro] for k, v in batch.items()} for i in range(0, per_rank, rows_per_micro)]
    reductions = count_calls(optimizer, "_sync_grad")
    outs = forward_backward(model, booster, optimizer, micro)
    # ZeRO keeps reduced grads in its own store; with a MoE data-parallel group of one rank (plugin ep), expert
    # grads need no reduction and stay in p.grad.
    scaler = grad_scaler(optimizer)  # fp16 gradients carry the loss scale
    scale = scaler.scale.item() if scaler is not None else 1.0
    grads = {}
    for name, p in model.unwrap().named_parameters():  # with a pipeline: this stage's parameters only
        g = optimizer.get_param_grad(p)
        grads[name] = (p.grad if g is None else g).float() / scale
    grads = gather_full(model, grads)
    before = gather_full(model, {n: p.detach().float().clone() for n, p in model.unwrap().named_parameters()})
    optimizer.step()  # lr 0: computes the clipping norm, leaves the weights; else w -= lr * clipped gradient
    grad_norm = optimizer.get_grad_norm()
    after = gather_full(model, {n: p.detach().float().clone() for n, p in model.unwrap().named_parameters()})
    stats = reduce_stats(outs, cfg, device)
    if rank == 0:
        torch.save({"loss": stats.loss, "stats": stats, "grads": grads, "grad_norm": grad_norm, "sizes": sizes,
                    "zero_reductions": reductions[0], "update": {n: after[n] - before[n] for n in after}}, out_file)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
