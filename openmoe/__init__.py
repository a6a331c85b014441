"""openmoe-train: the OpenMoE mixture-of-experts model, its expert-parallel trainer and inference."""

from openmoe.config import OpenMoeConfig, preset
from openmoe.model import OpenMoeForCausalLM

__all__ = ["OpenMoeConfig", "OpenMoeForCausalLM", "preset"]
