"""NVML through ctypes: the NVIDIA driver's own view of its GPUs, without nvidia-smi.

Used by the doctor (captioner/doctor.py) to report the driver and each GPU even when CUDA itself
cannot start (for example a driver too old for the torch build). Every call is checked; a
missing library or a failing call becomes `NvmlReport.error`, never an exception.
"""

from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass, field
from typing import Any

NVML_LIBRARY = "libnvidia-ml.so.1"
GIB = 1024**3


# --------------------------------------------------------------------------- NVML


class _NvmlMemory(ctypes.Structure):
    _fields_ = [
        ("total", ctypes.c_ulonglong),
        ("free", ctypes.c_ulonglong),
        ("used", ctypes.c_ulonglong),
    ]


@dataclass
class NvmlGpu:
    index: int
    name: str
    capability: str
    memory_total_gib: float
    memory_free_gib: float


@dataclass
class NvmlReport:
    """What the driver's management library says; `error` when it cannot be asked."""

    error: str | None = None
    driver_version: str | None = None
    cuda_driver_version: str | None = None  # the newest CUDA this driver supports
    gpus: list[NvmlGpu] = field(default_factory=list)


class _NvmlFailure(Exception):
    pass


def _nvml_call(lib: ctypes.CDLL, name: str, *args: Any) -> None:
    rc = getattr(lib, name)(*args)
    if rc != 0:
        lib.nvmlErrorString.restype = ctypes.c_char_p
        text = lib.nvmlErrorString(rc) or b"unknown error"
        raise _NvmlFailure(f"{name}: {text.decode(errors='replace')} (NVML error {rc})")


def _nvml_gpu(lib: ctypes.CDLL, index: int) -> NvmlGpu:
    handle = ctypes.c_void_p()
    _nvml_call(lib, "nvmlDeviceGetHandleByIndex_v2", ctypes.c_uint(index), ctypes.byref(handle))
    name = ctypes.create_string_buffer(96)
    _nvml_call(lib, "nvmlDeviceGetName", handle, name, ctypes.c_uint(len(name)))
    memory = _NvmlMemory()
    _nvml_call(lib, "nvmlDeviceGetMemoryInfo", handle, ctypes.byref(memory))
    major, minor = ctypes.c_int(), ctypes.c_int()
    _nvml_call(
        lib, "nvmlDeviceGetCudaComputeCapability", handle, ctypes.byref(major), ctypes.byref(minor)
    )
    return NvmlGpu(
        index=index,
        name=name.value.decode(errors="replace"),
        capability=f"{major.value}.{minor.value}",
        memory_total_gib=round(memory.total / GIB, 2),
        memory_free_gib=round(memory.free / GIB, 2),
    )


def nvml_query(library: str = NVML_LIBRARY) -> NvmlReport:
    """Driver version, CUDA level and GPUs from NVML, loaded with ctypes (no nvidia-smi)."""
    try:
        lib = ctypes.CDLL(library)
    except OSError as exc:
        return NvmlReport(error=str(exc))
    try:
        _nvml_call(lib, "nvmlInit_v2")
    except (_NvmlFailure, AttributeError) as exc:
        return NvmlReport(error=str(exc))
    report = NvmlReport()
    try:
        version = ctypes.create_string_buffer(96)
        _nvml_call(lib, "nvmlSystemGetDriverVersion", version, ctypes.c_uint(len(version)))
        report.driver_version = version.value.decode(errors="replace")
        cuda = ctypes.c_int()
        _nvml_call(lib, "nvmlSystemGetCudaDriverVersion_v2", ctypes.byref(cuda))
        report.cuda_driver_version = f"{cuda.value // 1000}.{cuda.value % 1000 // 10}"
        count = ctypes.c_uint()
        _nvml_call(lib, "nvmlDeviceGetCount_v2", ctypes.byref(count))
        report.gpus = [_nvml_gpu(lib, i) for i in range(count.value)]
    except (_NvmlFailure, AttributeError) as exc:
        report.error = str(exc)
    finally:
        with contextlib.suppress(Exception):
            lib.nvmlShutdown()
    return report
