"""ColossalAI shardformer policy for OpenMoE: swaps every sparse MLP for the expert-parallel layer and, with
pipeline parallelism, cuts the model into stages (openmoe/parallel/pipeline.py).

The plugin hands the policy its process groups through `shard_config` (ep_group, moe_dp_group); the EP layer is
built *from* the single-device layer (same router Parameter, sliced expert weights), and its expert parameters are
tagged as MoE tensors so the MoE ZeRO optimizer reduces and shards them over the MoE data-parallel group instead of
the whole data-parallel group. With pp_size > 1 each stage holds a contiguous run of decoder layers (plus the
embedding on the first, the final norm and lm_head on the last); ColossalAI sets the parameters of every other module
to None, and the model's forward is replaced by the stage's.
"""

from __future__ import annotations

from functools import partial

import torch.nn as nn
from colossalai.shardformer.policies.base_policy import ModulePolicyDescription, Policy, SubModuleReplacementDescription
from colossalai.tensor.moe_tensor.api import set_moe_tensor_ep_group

from openmoe.model import OpenMoeDecoderLayer, OpenMoeForCausalLM
from openmoe.moe import OpenMoeSparseMLP
from openmoe.parallel.expert_parallel import ExpertParallelMoE
from openmoe.parallel.pipeline import Stage, stage_forward


class _EPSwap:
    """Shardformer replacement target: `from_native_module` is what the sharder calls for each layer's `mlp`."""

    @staticmethod
    def from_native_module(module: nn.Module, process_group=None, ep_group=None, moe_dp_group=None,
                           comm_overlap: int = 0, hierarchical: bool = False, **kwargs):
        if not isinstance(module, OpenMoeSparseMLP):  # dense layers also have an `mlp`: leave them alone
            return module
        if ep_group.size() == 1:
            # nothing to exchange: keep the single-device layer (its grouped-GEMM path stays usable); the experts
            # are still tagged so the MoE ZeRO optimizer reduces them over the MoE data-parallel group
            layer = module
        else:
            layer = ExpertParallelMoE(module, ep_group, comm_overlap=comm_overlap, hierarchical=hierarchical)
        for p in layer.experts.parameters():
            set_moe_tensor_ep_group(p, ep_group)
        return layer


class OpenMoePolicy(Policy):
    def __init__(self, num_microbatches: int = 1, ep_options: dict | None = None):
        super().__init__()
        self.ep_options = ep_options or {}  # ExpertParallelMoE options: comm_overlap, hierarchical
        self.num_microbatches = num_microbatches  # what the 1F1B schedule divides the loss by (pp > 1)

    def config_sanity_check(self):
        cfg = self.shard_config
        if cfg.enable_tensor_parallelism or cfg.enable_sequence_parallelism:
            raise ValueError("tensor and sequence parallelism are not supported for OpenMoE; use tp_size=1, sp_size=1")
        sm = cfg.pipeline_stage_manager
        if sm is not None and (sm.is_interleave or sm.num_model_chunks != 1):
            raise ValueError("OpenMoE pipelines support the 1f1b schedule only (one model chunk per stage)")

    def preprocess(self) -> nn.Module:
        return self.model

    def module_policy(self):
        kwargs = dict(ep_group=self.shard_config.ep_group, moe_dp_group=self.shard_config.moe_dp_group,
                      **self.ep_options)
        swap = SubModuleReplacementDescription(suffix="mlp", target_module=_EPSwap, kwargs=kwargs)
        policy = {OpenMoeDecoderLayer: ModulePolicyDescription(sub_module_replacement=[swap])}
        if self.pipeline_stage_manager is not None:
            forward = partial(stage_forward, stage=self.stage())
            self.append_or_create_method_replacement({"forward": forward}, policy, OpenMoeForCausalLM)
        return policy

    def postprocess(self) -> nn.Module:
        return self.model

    def stage(self) -> Stage:
        """This rank's stage; the layer split is the plugin's num_layers_per_stage (colossal.build_plugin)."""
        sm, cfg = self.pipeline_stage_manager, self.model.config
        lo, hi = sm.get_stage_index(sm.distribute_layers(cfg.num_hidden_layers))
        return Stage(first=sm.is_first_stage(), last=sm.is_last_stage(), layers=range(int(lo), int(hi)),
                     num_moe_layers=cfg.num_moe_layers, num_microbatches=self.num_microbatches)

    def get_held_layers(self):
        if self.pipeline_stage_manager is None:
            return [self.model]
        stage, model = self.stage(), self.model.model
        held = [model.layers[i] for i in stage.layers]
        if stage.first:
            held.append(model.embed_tokens)
        if stage.last:
            held += [model.norm, self.model.lm_head]
        return held

    def get_shared_params(self):
        return []  # OpenMoE's lm_head is untied from the embedding
