"""GPU-kit stub of pycocotools.coco (lavis.tasks.captioning, lavis.tasks.dialogue)."""

from _gpu_kit_stub import placeholder

COCO = placeholder("pycocotools.coco", "COCO")
