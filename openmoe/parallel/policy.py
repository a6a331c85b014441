"""ColossalAI shardformer policy for OpenMoE: swaps every sparse MLP for the expert-parallel layer.

The plugin hands the policy its process groups through `shard_config` (ep_group, moe_dp_group); the EP layer is
built *from* the single-device layer (same router Parameter, sliced expert weights), and its expert parameters are
tagged as MoE tensors so the MoE ZeRO optimizer reduces and shards them over the MoE data-parallel group instead of
the whole data-parallel group.
"""

from __future__ import annotations

import torch.nn as nn
from colossalai.shardformer.policies.base_policy import ModulePolicyDescription, Policy, SubModuleReplacementDescription
from colossalai.tensor.moe_tensor.api import set_moe_tensor_ep_group

from openmoe.model import OpenMoeDecoderLayer
from openmoe.moe import OpenMoeSparseMLP
from openmoe.parallel.expert_parallel import ExpertParallelMoE


class _EPSwap:
    """Shardformer replacement target: `from_native_module` is what the sharder calls for each layer's `mlp`."""

    @staticmethod
    def from_native_module(module: nn.Module, process_group=None, ep_group=None, moe_dp_group=None, **kwargs):
        if not isinstance(module, OpenMoeSparseMLP):  # dense layers also have an `mlp`: leave them alone
            return module
        ep = ExpertParallelMoE(module, ep_group)
        for p in ep.experts.parameters():
            set_moe_tensor_ep_group(p, ep_group)
        return ep


class OpenMoePolicy(Policy):
    def config_sanity_check(self):
        cfg = self.shard_config
        if cfg.enable_tensor_parallelism or cfg.enable_sequence_parallelism:
            raise ValueError("tensor and sequence parallelism are not supported for OpenMoE; use tp_size=1, sp_size=1")

    def preprocess(self) -> nn.Module:
        return self.model

    def module_policy(self):
        kwargs = dict(ep_group=self.shard_config.ep_group, moe_dp_group=self.shard_config.moe_dp_group)
        swap = SubModuleReplacementDescription(suffix="mlp", target_module=_EPSwap, kwargs=kwargs)
        return {OpenMoeDecoderLayer: ModulePolicyDescription(sub_module_replacement=[swap])}

    def postprocess(self) -> nn.Module:
        return self.model

    def get_held_layers(self):
        if self.pipeline_stage_manager is not None:
            raise ValueError("pipeline parallelism (hybrid plugin with pp_size > 1) is not implemented yet")
        return [self.model]

    def get_shared_params(self):
        return []  # OpenMoE's lm_head is untied from the embedding
