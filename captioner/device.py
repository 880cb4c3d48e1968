"""Which device and precision the model runs on, decided in one place, and why.

The service's main deployment is a GPU container, yet `torch.cuda.is_available()` only says
*whether* CUDA works, never why not: on a host whose NVIDIA driver is older than the one the torch
build needs (torch 2.13.0+cu130 needs the 580 series), it is simply False, and a service that
picked "CUDA if available, else CPU" would quietly run some 17x slower. So the decision here reads
the driver's own traces (`/proc/driver/nvidia/version`, `/sys/module/nvidia/version`, the
`/dev/nvidia*` nodes, the mounted `libcuda.so.*`, the NVIDIA container variables) under a
filesystem root, names the cause when a GPU is visible but CUDA is not usable, and:

- `DEVICE=auto` falls back to the CPU with ONE logged error and a warning for `/health`;
- `DEVICE=cuda` refuses to start, with the same cause in the `DeviceError` message.

`plan_device` is the one entry point: `blip2_model.Captioner.load`, `/health` and the doctor
command (captioner/doctor.py) all report the same `DevicePlan`, so what the service says it would do
and what it does cannot drift apart. `diagnose_gpu` takes the root and the environment as
parameters, so tests give it a temporary directory with simulated driver files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioner.gpu_diagnosis import GpuDiagnosis, diagnose_gpu, required_driver

# The diagnosis is re-exported: the doctor and the tests read everything about devices here.
__all__ = [
    "DeviceError",
    "DevicePlan",
    "GpuDiagnosis",
    "cpu_supports_bf16",
    "diagnose_gpu",
    "expected_device",
    "plan_device",
    "required_driver",
    "resolve_device",
    "resolve_precision",
]

log = logging.getLogger(__name__)

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
FIX_HINT = "See docs/gpu.md; set DEVICE=cpu to run on the CPU on purpose."


class DeviceError(RuntimeError):
    """The configured device or precision cannot be used on this machine; the message says why."""


def arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch built for `arch_list` (e.g. ["sm_75", ..., "compute_90"]) has kernels
    for a GPU of compute capability `capability`.

    A cubin for sm_XY runs on the same major with minor >= Y (sm_90a only on 9.0 exactly); PTX
    (compute_XY) is compiled on the fly for any capability >= X.Y. An empty list (unknown) passes.
    """
    if not arch_list:
        return True
    for arch in arch_list:
        found = re.fullmatch(r"(sm|compute)_(\d+?)(\d)([af]?)", arch)
        if not found:
            continue
        kind, major, minor, suffix = (
            found.group(1),
            int(found.group(2)),
            int(found.group(3)),
            found.group(4),
        )
        if kind == "compute" and capability >= (major, minor):
            return True
        if kind == "sm" and capability[0] == major:
            if suffix == "a" and capability[1] == minor:
                return True
            if suffix != "a" and capability[1] >= minor:
                return True
    return False


def torch_arch_list(torch: Any) -> list[str]:
    """The GPU architectures torch was compiled for, readable even without a GPU."""
    with contextlib.suppress(Exception):
        flags = torch._C._cuda_getArchFlags()
        if flags:
            return str(flags).split()
    with contextlib.suppress(Exception):
        return list(torch.cuda.get_arch_list())
    return []


@dataclass(frozen=True)
class CudaState:
    """What torch itself says about CUDA in this process."""

    available: bool
    device_count: int
    torch_warning: str | None  # what torch warned while initialising CUDA, if anything


def cuda_state(torch: Any) -> CudaState:
    """Ask torch once, keeping the warning it gives on a failed CUDA init (often the cause)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = bool(torch.cuda.is_available())
    count = int(torch.cuda.device_count()) if available else 0
    message = next((str(w.message) for w in caught if "cuda" in str(w.message).lower()), None)
    return CudaState(available, count, message)


def device_capability_problem(torch: Any, index: int) -> str | None:
    """Why CUDA device `index` cannot run this torch build's kernels, or None."""
    capability = tuple(torch.cuda.get_device_capability(index))
    arch_list = torch_arch_list(torch)
    if arch_supported(capability, arch_list):  # type: ignore[arg-type]
        return None
    name = torch.cuda.get_device_name(index)
    return (
        f"GPU {index} ({name}) has compute capability {capability[0]}.{capability[1]}, but torch "
        f"{torch.__version__} only has kernels for {' '.join(arch_list)} (CUDA 13 dropped "
        "Maxwell, Pascal and Volta): use a Turing (7.5) or newer GPU"
    )


def _first_use_problem(torch: Any, index: int, diag: GpuDiagnosis) -> str | None:
    """Create the CUDA context and run one kernel on device `index`: is_available() can be True
    while the first real use fails (no /dev/nvidia-uvm, a GPU in a bad state, ...)."""
    try:
        torch.ones(8, device=f"cuda:{index}").sum().item()
    except Exception as exc:  # CUDA errors surface as RuntimeError/AcceleratorError
        traces = f"; the driver traces say: {diag.cause}" if diag.cause else ""
        return f"cuda:{index} fails on first use: {type(exc).__name__}: {exc}{traces}"
    return None


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class DevicePlan:
    """The device and precision the service runs with, why, and what /health should warn."""

    requested_device: str
    requested_precision: str
    device: str
    precision: str
    reason: str
    warnings: tuple[str, ...] = ()
    diagnosis: GpuDiagnosis | None = field(default=None, compare=False)

    @property
    def degraded(self) -> bool:
        """A GPU is visible but the service runs on the CPU because CUDA is unusable."""
        return bool(self.warnings)


def normalise_device(requested: str | None) -> str:
    """`None`/empty -> "auto"; refuse anything but auto, cpu, cuda, cuda:N."""
    value = (requested or "auto").strip().lower()
    if not DEVICE_PATTERN.match(value):
        raise DeviceError(f"DEVICE must be auto, cpu, cuda or cuda:N, got {requested!r}")
    return value


def _unusable_cause(diag: GpuDiagnosis, state: CudaState) -> str:
    """Why CUDA cannot be used, in one sentence, from the best evidence available."""
    if diag.cause:
        return diag.cause
    if not diag.visible:
        return (
            "no NVIDIA GPU is visible (no NVIDIA_VISIBLE_DEVICES, no /dev/nvidia*, no NVIDIA "
            "driver loaded)"
        )
    said = f"; torch said: {state.torch_warning}" if state.torch_warning else ""
    return (
        f"torch.cuda.is_available() is False although the driver traces look right "
        f"(driver {diag.driver_version or 'unknown'}, {', '.join(diag.device_nodes) or 'no nodes'})"
        f"{said}"
    )


def _fallback_warning(diag: GpuDiagnosis, state: CudaState, cause: str) -> str:
    seen = ", ".join(diag.evidence) or f"torch sees {state.device_count} CUDA device(s)"
    return (
        f"running on the CPU, not the GPU (many times slower): a GPU is visible ({seen}) but "
        f"CUDA cannot be used: {cause}. {FIX_HINT}"
    )


def _choose_cuda(
    requested: str, diag: GpuDiagnosis, state: CudaState, torch: Any
) -> tuple[str | None, str]:
    """(device, reason) when CUDA can run the request, else (None, cause)."""
    if not state.available:
        return None, _unusable_cause(diag, state)
    index = int(requested.split(":")[1]) if ":" in requested else 0
    if index >= state.device_count:
        return None, f"{requested} does not exist: {state.device_count} CUDA device(s) visible"
    problem = device_capability_problem(torch, index) or _first_use_problem(torch, index, diag)
    if problem:
        return None, problem
    major, minor = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    device = "cuda" if requested in ("auto", "cuda") else requested
    return device, f"CUDA is usable: GPU {index} {name}, compute capability {major}.{minor}"


def choose_device(
    requested: str, diag: GpuDiagnosis, state: CudaState, torch: Any
) -> tuple[str, str, tuple[str, ...]]:
    """(device, reason, warnings) for a normalised DEVICE value; DeviceError if impossible."""
    if requested == "cpu":
        return "cpu", "DEVICE=cpu", ()
    device, why = _choose_cuda(requested, diag, state, torch)
    if device is not None:
        return device, f"DEVICE={requested}: {why}", ()
    if requested != "auto":
        raise DeviceError(f"DEVICE={requested} but CUDA cannot be used: {why}")
    if diag.visible or state.available:
        return (
            "cpu",
            f"DEVICE=auto fell back to the CPU: {why}",
            (_fallback_warning(diag, state, why),),
        )
    return "cpu", f"DEVICE=auto: CPU, {why}", ()


def cpu_supports_bf16() -> bool:
    """oneDNN's own check (AVX-512 BF16 or AMX); what makes bf16 worthwhile on a CPU."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def choose_precision(precision: str, device: str, torch: Any) -> tuple[str, str]:
    """(precision, reason): `auto` is fp16 on CUDA and fp32 on the CPU; refuse what the
    hardware cannot do."""
    cuda = device.startswith("cuda")
    if precision == "auto":
        if cuda:
            return "fp16", "PRECISION=auto: fp16 on CUDA (captions may differ slightly from fp32)"
        return "fp32", "PRECISION=auto: fp32 on the CPU (captions identical to the reference)"
    if precision == "fp16" and not cuda:
        hint = "bf16 (this CPU supports it) or fp32" if cpu_supports_bf16() else "fp32"
        raise DeviceError(f"PRECISION=fp16 needs a CUDA device; on the CPU use {hint}")
    if precision == "bf16" and cuda and not _cuda_bf16(torch, device):
        raise DeviceError(
            f"PRECISION=bf16 needs a GPU of compute capability 8.0 (Ampere) or newer; {device} "
            "is older: use fp16"
        )
    if precision == "bf16" and not cuda and not cpu_supports_bf16():
        raise DeviceError(
            "PRECISION=bf16 is not supported by this CPU (no AVX-512 BF16/AMX); use fp32"
        )
    if precision not in ("fp32", "bf16", "fp16"):
        raise DeviceError(f"PRECISION must be fp32, bf16, fp16 or auto, got {precision!r}")
    note = " (captions identical to the reference)" if precision == "fp32" else ""
    return precision, f"PRECISION={precision}{note}"


def _cuda_bf16(torch: Any, device: str) -> bool:
    index = int(device.split(":")[1]) if ":" in device else 0
    return tuple(torch.cuda.get_device_capability(index)) >= (8, 0)


def plan_device(
    requested_device: str | None,
    requested_precision: str = "fp32",
    *,
    root: Path = Path("/"),
    environ: Mapping[str, str] | None = None,
    report: bool = True,
) -> DevicePlan:
    """Decide device and precision for the given DEVICE and PRECISION settings.

    `environ` defaults to the process environment: it is the one the CUDA runtime itself reads
    (NVIDIA_VISIBLE_DEVICES, CUDA_VISIBLE_DEVICES), so diagnosing any other would be diagnosing
    a different process. `report=True` logs ONE error when DEVICE=auto falls back to the CPU
    although a GPU is visible (the service); the doctor passes False and prints it instead.
    Raises DeviceError when the configured device or precision cannot be used.
    """
    import torch

    env = os.environ if environ is None else environ
    requested = normalise_device(requested_device)
    # torch first: its CUDA init may create missing nodes (nvidia-modprobe) the diagnosis reads.
    state = cuda_state(torch) if requested != "cpu" else CudaState(False, 0, None)
    diag = diagnose_gpu(
        root=root, environ=env, torch_cuda=torch.version.cuda, torch_version=torch.__version__
    )
    device, reason, warns = choose_device(requested, diag, state, torch)
    try:
        precision, why = choose_precision(requested_precision, device, torch)
    except DeviceError as exc:
        if requested == "auto":  # say why auto chose this device: often the real problem
            raise DeviceError(f"{exc}. {reason}") from None
        raise
    if warns and report:
        log.error("%s", warns[0])
    return DevicePlan(
        requested_device=requested,
        requested_precision=requested_precision,
        device=device,
        precision=precision,
        reason=f"{reason}; {why}",
        warnings=warns,
        diagnosis=diag,
    )


def cuda_problem(*, root: Path = Path("/"), environ: Mapping[str, str] | None = None) -> str | None:
    """None when CUDA device 0 can run this torch build, else why not (GPU test skip reasons)."""
    import torch

    state = cuda_state(torch)
    diag = diagnose_gpu(
        root=root,
        environ=os.environ if environ is None else environ,
        torch_cuda=torch.version.cuda,
        torch_version=torch.__version__,
    )
    device, why = _choose_cuda("cuda", diag, state, torch)
    return None if device else why


# --------------------------------------------------------------------------- older API


def resolve_device(requested: str | None) -> str:
    """The device alone (kept for callers not yet on `plan_device`)."""
    return plan_device(requested, "fp32").device


def resolve_precision(precision: str, device: str) -> str:
    """The precision alone for an already chosen device (kept for older callers)."""
    import torch

    return choose_precision(precision, device, torch)[0]


def expected_device(requested: str | None) -> str:
    """The device family the settings ask for, without importing torch (for `/health` while
    the model loads)."""
    if requested and requested.strip().lower().startswith("cuda"):
        return "cuda"
    return "cpu"
