"""Shared by the device tests (tests/test_model_device*.py): simulated hosts, each a temporary
directory holding what the NVIDIA driver leaves behind (/proc/driver/nvidia/version, /dev/nvidia*,
libcuda.so.*), and the environment of a container given a GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PROPRIETARY = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  {v}  Thu Dec 28 15:37:48 UTC 2023\n"
    "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
)
ALL_NODES = ("nvidia0", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools")
GPU_ENV = {"NVIDIA_VISIBLE_DEVICES": "all"}


def make_host(
    base: Path,
    *,
    driver: str | None = None,
    version_text: str = PROPRIETARY,
    sys_module: bool = False,
    nodes: tuple[str, ...] = (),
    libcuda: str | None = None,
    lib_dir: str = "usr/lib/x86_64-linux-gnu",
    gpu_model: str | None = None,
) -> Path:
    """A simulated host root with the traces an NVIDIA driver leaves."""
    root = base / "host"
    (root / "dev").mkdir(parents=True)
    if driver and sys_module:
        (root / "sys/module/nvidia").mkdir(parents=True)
        (root / "sys/module/nvidia/version").write_text(driver + "\n")
    elif driver:
        (root / "proc/driver/nvidia").mkdir(parents=True)
        (root / "proc/driver/nvidia/version").write_text(version_text.format(v=driver))
    if gpu_model:
        info = root / "proc/driver/nvidia/gpus/0000:00:1e.0/information"
        info.parent.mkdir(parents=True)
        info.write_text(f"Model: \t\t {gpu_model}\nIRQ:   \t\t 36\nBus Type: \t PCIe\n")
    for node in nodes:
        (root / "dev" / node).touch()
    if libcuda:
        libs = root / lib_dir
        libs.mkdir(parents=True, exist_ok=True)
        (libs / f"libcuda.so.{libcuda}").touch()
        (libs / "libcuda.so.1").symlink_to(f"libcuda.so.{libcuda}")
    return root


def healthy(base: Path, version: str = "580.65.06", **kw: Any) -> Path:
    """A host whose traces all look right for torch's CUDA 13.0."""
    return make_host(base, driver=version, nodes=ALL_NODES, libcuda=version, **kw)
