"""openmoe-train: the OpenMoE mixture-of-experts model, its expert-parallel trainer and inference.

Importing the package registers the model with transformers' Auto classes (model_type "openmoe"), so
`AutoConfig` / `AutoModelForCausalLM.from_pretrained(dir)` work on our exports without trust_remote_code.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from openmoe.config import ModelOptions, OpenMoeConfig, preset
from openmoe.model import OpenMoeForCausalLM

AutoConfig.register(OpenMoeConfig.model_type, OpenMoeConfig, exist_ok=True)
AutoModelForCausalLM.register(OpenMoeConfig, OpenMoeForCausalLM, exist_ok=True)

__all__ = ["ModelOptions", "OpenMoeConfig", "OpenMoeForCausalLM", "preset"]
