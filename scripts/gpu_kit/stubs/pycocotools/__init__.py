"""GPU-kit stub of pycocotools: lavis.tasks imports COCO for caption evaluation only."""

from _gpu_kit_stub import IS_GPU_KIT_STUB

__all__ = ["IS_GPU_KIT_STUB"]
