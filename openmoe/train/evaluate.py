"""Evaluation during training: the eval loss (cross-entropy over every target token of the eval set), its
perplexity and the router loss parts, on every rank under every plugin. Collective over the world.

The eval batches (data.eval_batches) give every rank the same number of fixed-shape batches, padded with rows whose
labels are all ignored, so expert-parallel all-to-alls line up and the fillers add nothing. Per batch the model returns
the mean CE over its target tokens and their count; the sums of CE * count and of count over batches and ranks give the
loss independently of how the set is cut. The model runs in eval mode (eval capacity factor, no dropout) and without
gradients (the LM head then takes its chunked reference path).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from openmoe.backend.colossal import dp_rank, is_pipeline
from openmoe.train.builder import TrainState
from openmoe.train.step import to_device
from openmoe.train.trainer import StepHook


def forward_only(state: TrainState, batch: dict) -> list:
    """The outputs this rank holds for one batch: all of them, or with a pipeline the last stage's micro-batches."""
    if not is_pipeline(state.booster):
        return [state.model(**batch)]
    outs = []

    def criterion(out, micro_batch):  # last stage only
        outs.append(out)
        return out.loss

    state.booster.execute_pipeline(iter([batch]), state.model, criterion, optimizer=None, return_loss=False)
    return outs


@torch.no_grad()
def evaluate(state: TrainState) -> dict[str, float]:
    """{eval_loss, eval_ppl, eval_aux_loss, eval_router_z_loss, eval_tokens} over the run's eval set."""
    from openmoe.data import eval_batches

    model = state.model
    was_training = model.training
    model.eval()
    # [sum CE * tokens, tokens, sum aux, sum router z, outputs counted]
    sums = torch.zeros(5, dtype=torch.float64)
    rows = state.run.optim.batch_size
    if is_pipeline(state.booster):  # the schedule cuts each batch into the micro-batches of a whole training step
        rows *= state.run.optim.grad_accum
    for batch in eval_batches(state.eval_examples, rows, dp_rank(state.boosted.plugin), state.sizes.dp,
                              pad_id=state.cfg.pad_token_id, max_length=state.run.data.max_length):
        for out in forward_only(state, to_device([batch], state.device)[0]):
            tokens = float(out.num_tokens)
            sums += torch.tensor([float(out.ce_loss) * tokens, tokens, float(out.aux_loss),
                                  float(out.router_z_loss), 1.0], dtype=torch.float64)
    sums = sums.to(state.device)
    dist.all_reduce(sums)
    ce_sum, tokens, aux, router_z, count = sums.tolist()
    if was_training:
        model.train()
    loss = ce_sum / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_aux_loss": aux / max(count, 1.0),
            "eval_router_z_loss": router_z / max(count, 1.0), "eval_tokens": int(tokens)}


class Evaluator(StepHook):
    """Evaluate every --eval_interval applied steps and after the last step; the figures go into that step's metrics
    record and, on rank 0, the progress output."""

    def after_step(self, trainer, result) -> None:
        state = trainer.state
        interval = state.run.data.eval_interval
        last = result.step == state.total_steps
        if result.applied and (last or (interval and result.step % interval == 0)):
            result.extra.update(evaluate(state))
            if state.rank == 0:
                print(f"\nstep {result.step}: eval loss {result.extra['eval_loss']:.4f}, ppl "
                      f"{result.extra['eval_ppl']:.2f} over {result.extra['eval_tokens']} tokens", flush=True)
