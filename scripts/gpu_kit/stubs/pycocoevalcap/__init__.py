"""GPU-kit stub of pycocoevalcap: lavis.tasks imports COCOEvalCap for caption evaluation only."""

from _gpu_kit_stub import IS_GPU_KIT_STUB

__all__ = ["IS_GPU_KIT_STUB"]
