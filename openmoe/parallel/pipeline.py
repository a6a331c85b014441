"""Pipeline stages of OpenMoeForCausalLM for the hybrid plugin (pp_size > 1). Shapes: B micro-batch, S seq, H hidden,
E experts, L_seen MoE layers held by this and earlier stages.

ColossalAI's 1F1B schedule calls every stage as `model(**micro_batch, **previous_stage_outputs)`. Every stage gets
the micro-batch (so each builds its own positions, attention mask and token mask from `attention_mask`); the first
holds the embedding, each a contiguous run of decoder layers, the last the final norm, lm_head and the loss, whose
value the schedule divides by the number of micro-batches M (and, under fp16, multiplies by the loss scale s before
backward). A non-last stage returns a dict of fixed-shape tensors (the schedule caches their metadata):

  hidden_states [B, S, H]             compute dtype, with gradient
  router_grad   []                    fp32, value exactly 0: the path by which the router losses of this and
                                      earlier stages receive their gradient (below)
  moe_stats     [L_seen, 3 + E] int32 the bits of fp32 rows (aux, z, dropped fraction, tokens per expert) of every
                                      MoE layer so far, for the loss value and the logs; detached

Router losses across stages. The loss is ce + z + aux_factor * mean_l(aux_l) + z_factor * mean_l(z_l) over ALL MoE
layers of the model, so a layer on an earlier stage needs d loss / d aux_l = aux_factor / num_moe_layers times what
the schedule applies (s / M). No global state supplies s / M (Megatron sets a class attribute every step): each stage
adds r - r.detach() (value 0, gradient 1) for its weighted router losses r to `router_grad`, and the last stage adds
`router_grad` to its loss, so autograd hands back exactly s / M. The plugin casts every floating stage input to the
compute dtype (bf16/fp16), also on the gradient's way back, which would round s / M (say 1/3); so the last stage adds
router_grad * M * 2^-20 and each stage scales its contribution by 2^20 / M: what crosses in bf16/fp16 is then
s * 2^-20, a power of two (s = 1 in bf16; fp16's dynamic scale is a power of two in [1, 2^32]), hence exact in both
(fp16 holds powers of two from 2^-24 to 2^15). The loss VALUE gets the earlier layers' router losses from moe_stats.
fp32 statistics travel as int32 bits for the same reason: a float would arrive rounded to bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openmoe.model import OpenMoeForCausalLM, OpenMoeOutput, rope_cos_sin
from openmoe.moe import MoeAux

GRAD_IN_FLIGHT = 2.0**-20  # router_grad's gradient is s * GRAD_IN_FLIGHT between stages: a power of two


def split_layers(num_layers: int, pp_size: int) -> list[int]:
    """Decoder layers per stage: even, the remainder to the middle stages (as ColossalAI's stage manager does), since
    the first stage also holds the embedding and the last the lm_head and loss."""
    base, rest = divmod(num_layers, pp_size)
    counts = [base] * pp_size
    start = pp_size // 2 - rest // 2
    for i in range(start, start + rest):
        counts[i] += 1
    return counts


def stage_ranges(num_layers: int, pp_size: int) -> list[range]:
    bounds = [0]
    for n in split_layers(num_layers, pp_size):
        bounds.append(bounds[-1] + n)
    return [range(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


@dataclass(frozen=True)
class Stage:
    first: bool
    last: bool
    layers: range  # decoder layers this stage runs
    num_moe_layers: int  # in the whole model: the router losses are means over all of them
    num_microbatches: int  # M, by which the schedule divides the last stage's loss


def stage_forward(self: OpenMoeForCausalLM, input_ids, attention_mask=None, labels=None, position_ids=None,
                  return_logits=None, hidden_states=None, router_grad=None, moe_stats=None, *, stage: Stage):
    """OpenMoeForCausalLM.forward restricted to one stage (bound to the model by the policy)."""
    # the same inputs and the same layer loop (incl. activation checkpointing and its policy) as the full model
    position_ids, allowed, token_mask = self.model.layer_inputs(input_ids, attention_mask, position_ids, 0)
    h = self.model.embed_tokens(input_ids) if stage.first else hidden_states  # [B, S, H]
    cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, h.dtype)
    h, own = self.model.run_layers(h, cos, sin, allowed, token_mask, stage.layers)
    moe = _decode_stats(moe_stats) + own
    if not stage.last:
        return {"hidden_states": h, "router_grad": _add_router_grad(self.config, stage, router_grad, own, h),
                "moe_stats": _encode_stats(moe)}
    return _head_and_loss(self, stage, self.model.norm(h), labels, return_logits, moe, router_grad)


def _add_router_grad(cfg, stage: Stage, router_grad, own: list[MoeAux], like: torch.Tensor) -> torch.Tensor:
    carried = like.new_zeros((), dtype=torch.float32) if router_grad is None else router_grad.float()
    if not own:
        return carried
    # this stage's share of aux_factor * mean_l(aux_l) + z_factor * mean_l(z_l)
    r = (cfg.router_aux_loss_factor * torch.stack([m.aux_loss for m in own]).sum()
         + cfg.router_z_loss_factor * torch.stack([m.z_loss for m in own]).sum()) / stage.num_moe_layers
    return carried + (r - r.detach()) / (GRAD_IN_FLIGHT * stage.num_microbatches)


def _head_and_loss(self, stage: Stage, h, labels, return_logits, moe: list[MoeAux], router_grad) -> OpenMoeOutput:
    # earlier layers' aux/z are detached values here (their gradient comes through router_grad)
    out = self.head_and_loss(h, labels, return_logits, moe)
    if labels is not None and router_grad is not None:  # value 0; carries s / M back to earlier stages' router losses
        out.loss = out.loss + router_grad.float() * (GRAD_IN_FLIGHT * stage.num_microbatches)
    return out


def _encode_stats(moe: list[MoeAux]) -> torch.Tensor:
    rows = [torch.cat([torch.stack([m.aux_loss.detach().float(), m.z_loss.detach().float(),
                                    m.dropped_fraction.float()]), m.tokens_per_expert.float()]) for m in moe]
    return torch.stack(rows).view(torch.int32)  # [L_seen, 3 + E]: fp32 bits


def _decode_stats(bits: torch.Tensor | None) -> list[MoeAux]:
    if bits is None:
        return []
    rows = bits.view(torch.float32)  # [L_seen, 3 + E]
    return [MoeAux(aux_loss=r[0], z_loss=r[1], dropped_fraction=r[2], tokens_per_expert=r[3:].long()) for r in rows]


def detached(out: OpenMoeOutput) -> OpenMoeOutput:
    """What the trainer keeps of a micro-batch's output for logging (no autograd graph)."""
    moe = [MoeAux(m.aux_loss.detach(), m.z_loss.detach(), m.tokens_per_expert, m.dropped_fraction) for m in out.moe]
    return OpenMoeOutput(loss=out.loss.detach(), ce_loss=out.ce_loss.detach(), z_loss=out.z_loss.detach(),
                         aux_loss=out.aux_loss.detach(), router_z_loss=out.router_z_loss.detach(),
                         num_tokens=out.num_tokens, moe=moe)
