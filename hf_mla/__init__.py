"""hf_mla: Multi-head Latent Attention models for Hugging Face transformers.

Importing the package registers the model with the Auto classes, and marks the classes so that `save_pretrained`
writes `auto_map` and copies the config and modeling files next to the weights: the checkpoint then loads with
`trust_remote_code=True` where this package is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_hf_mla import MlaConfig
from .modeling_hf_mla import MlaForCausalLM, MlaModel, MlaPreTrainedModel


__version__ = "0.1.0"

AutoConfig.register(MlaConfig.model_type, MlaConfig, exist_ok=True)
AutoModel.register(MlaConfig, MlaModel, exist_ok=True)
AutoModelForCausalLM.register(MlaConfig, MlaForCausalLM, exist_ok=True)
MlaConfig.register_for_auto_class("AutoConfig")
MlaModel.register_for_auto_class("AutoModel")
MlaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MlaConfig", "MlaModel", "MlaForCausalLM", "MlaPreTrainedModel"]
