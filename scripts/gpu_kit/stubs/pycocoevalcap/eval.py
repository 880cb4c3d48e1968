"""GPU-kit stub of pycocoevalcap.eval (lavis.tasks.captioning, lavis.tasks.dialogue)."""

from _gpu_kit_stub import placeholder

COCOEvalCap = placeholder("pycocoevalcap.eval", "COCOEvalCap")
