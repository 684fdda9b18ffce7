"""A compact Eagle 2.5: model, processor, data pipeline and the progressive long-context trainer.

Importing this package registers model type `eagle_2_5_vl` with transformers' Auto classes (AutoConfig,
AutoModel, AutoModelForImageTextToText, AutoModelForCausalLM, AutoProcessor, AutoImageProcessor), so a saved or
released Eagle 2.5 folder loads with `AutoModel.from_pretrained(folder)` and no remote code. AutoModel gives
the whole model with its LM head: the released checkpoint nests a complete causal LM under `language_model`.
"""
from longvl import kernels  # noqa: F401  (first: without CUDA it sets TRITON_INTERPRET before anything loads Triton)
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
# From its module: transformers 5.17's top-level name asks for torchvision, which nothing here needs.
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from longvl.eagle.configuration_eagle import EagleConfig
from longvl.eagle.image_processing_eagle import EagleImageProcessor
from longvl.eagle.modeling_eagle import EagleForConditionalGeneration
from longvl.eagle.processor import EagleProcessor

# exist_ok: ours must win should a transformers release ever define the same model type.
AutoConfig.register(EagleConfig.model_type, EagleConfig, exist_ok=True)
for _auto_model in (AutoModel, AutoModelForImageTextToText, AutoModelForCausalLM):
    _auto_model.register(EagleConfig, EagleForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(EagleConfig, image_processor_classes={"pil": EagleImageProcessor}, exist_ok=True)
AutoProcessor.register(EagleConfig, EagleProcessor, exist_ok=True)

__all__ = ["EagleConfig", "EagleForConditionalGeneration", "EagleImageProcessor", "EagleProcessor"]
