"""GPU-kit stub of decord (video decoding): lavis.datasets.data_utils imports VideoReader and
calls `decord.bridge.set_bridge("torch")` at import; captioning images never reads a video."""

from _gpu_kit_stub import IS_GPU_KIT_STUB, placeholder

from . import bridge

VideoReader = placeholder("decord", "VideoReader")
__all__ = ["IS_GPU_KIT_STUB", "VideoReader", "bridge"]
