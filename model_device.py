"""Which device and precision the model runs on, decided in one place.

`blip2_model.Captioner.load` asks here; `/health` and the doctor command report the same answer,
so what the service says it would do and what it does cannot drift apart.
"""

from __future__ import annotations


class DeviceError(RuntimeError):
    """The configured device or precision cannot be used on this machine; the message says why."""


def resolve_device(requested: str | None) -> str:
    """`None`/`auto`: CUDA when usable, else the CPU. An explicit CUDA device must be usable."""
    import torch

    if requested in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"DEVICE={requested} but CUDA is not available")
    if requested != "cpu" and not requested.startswith("cuda"):
        raise DeviceError(f"DEVICE must be cpu, cuda or cuda:N, got {requested!r}")
    return requested


def expected_device(requested: str | None) -> str:
    """The device family the settings ask for, without importing torch (for `/health` while
    the model loads)."""
    if requested and requested.startswith("cuda"):
        return "cuda"
    return "cpu"


def cpu_supports_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: str) -> str:
    """`auto`: fp16 on CUDA, fp32 on CPU. Refuse what the hardware cannot do."""
    if precision == "auto":
        return "fp16" if device.startswith("cuda") else "fp32"
    if precision == "fp16" and not device.startswith("cuda"):
        raise DeviceError("PRECISION=fp16 needs a CUDA device; use fp32 or bf16 on CPU")
    if precision == "bf16" and device == "cpu" and not cpu_supports_bf16():
        raise DeviceError("PRECISION=bf16 is not supported by this CPU; use fp32")
    return precision
