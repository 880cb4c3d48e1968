"""GPU-kit stub of spaCy: lavis.models.img2prompt_models imports it; captioning never calls it."""

from _gpu_kit_stub import IS_GPU_KIT_STUB, function

load = function("spacy", "load")
__all__ = ["IS_GPU_KIT_STUB", "load"]
