"""captioner/device.py: the GPU diagnosis.

No GPU is needed: the diagnosis reads a filesystem root and an environment, so each host is a
temporary directory holding what the NVIDIA driver leaves behind (/proc/driver/nvidia/version,
/dev/nvidia*, libcuda.so.*). Every cause the diagnosis names (driver too old, no device nodes,
no driver library, versions that differ, GPUs hidden, WSL2) is one simulated host; the arch
support of the locked torch is checked too. The device plan, the doctor and the fp16 path on the
CPU are in test_model_device_plan.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from captioner import device as model_device
from captioner.device import arch_supported, diagnose_gpu
from model_device_helpers import ALL_NODES, GPU_ENV, PROPRIETARY, healthy, make_host

ROOT = Path(__file__).resolve().parent.parent

OPEN_MODULE = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  {v}  Release Build  "
    "(dvs-builder@U16-I3-B03-4-3)  Wed Aug 27 21:54:48 UTC 2025\nGCC version:  gcc 13.3.0\n"
)


def diagnose(root: Path, environ: dict[str, str] | None = None, cuda: str | None = "13.0") -> Any:
    return diagnose_gpu(
        root=root,
        environ=GPU_ENV if environ is None else environ,
        torch_cuda=cuda,
        torch_version="2.13.0+cu130",
    )


# --------------------------------------------------------------------------- diagnosis


def test_no_gpu_anywhere_is_no_problem(tmp_path: Path) -> None:
    diag = diagnose(make_host(tmp_path), environ={})
    assert not diag.visible and diag.evidence == () and diag.cause is None


def test_healthy_host_has_no_problems(tmp_path: Path) -> None:
    diag = diagnose(healthy(tmp_path, gpu_model="NVIDIA A10G"))
    assert diag.visible
    assert diag.problems == ()
    assert diag.kernel_driver == diag.library_driver == "580.65.06"
    assert diag.library_path == "/usr/lib/x86_64-linux-gnu/libcuda.so.1"
    assert diag.gpu_models == ("NVIDIA A10G",)
    assert diag.required_driver == "580"
    assert "/dev/nvidia0" in diag.evidence and "NVIDIA_VISIBLE_DEVICES=all" in diag.evidence


def test_driver_too_old_for_cuda_13(tmp_path: Path) -> None:
    diag = diagnose(healthy(tmp_path, "535.154.05"))
    assert diag.problems == (diag.cause,)  # the one thing wrong, nothing invented
    assert "NVIDIA driver 535.154.05 is too old" in diag.cause
    assert "CUDA 13.0 needs driver 580 or newer" in diag.cause


@pytest.mark.parametrize(
    ("text", "sys_module", "version"),
    [
        (PROPRIETARY, False, "570.133.20"),
        (OPEN_MODULE, False, "575.57.08"),
        (OPEN_MODULE.replace("x86_64", "aarch64"), False, "560.35.03"),
        ("", True, "550.54.15"),
    ],
    ids=["proprietary", "open-module", "aarch64", "sys-module"],
)
def test_driver_version_from_each_file_format(
    tmp_path: Path, text: str, sys_module: bool, version: str
) -> None:
    root = make_host(
        tmp_path,
        driver=version,
        version_text=text,
        sys_module=sys_module,
        nodes=ALL_NODES,
        libcuda=version,
    )
    diag = diagnose(root)
    assert diag.kernel_driver == version
    assert diag.kernel_driver_source == (
        "/sys/module/nvidia/version" if sys_module else "/proc/driver/nvidia/version"
    )
    assert "too old" in diag.cause


def test_580_is_enough_and_cuda_12_needs_less(tmp_path: Path) -> None:
    assert diagnose(healthy(tmp_path, "580.65.06")).problems == ()
    assert diagnose(healthy(tmp_path / "b", "550.54.15"), cuda="12.8").problems == ()
    assert model_device.required_driver("12.8") == (525, 60, 13)
    assert model_device.required_driver(None) is None


def test_driver_loaded_but_no_device_nodes(tmp_path: Path) -> None:
    """The classic container started without --gpus: the host's driver shows, nodes do not."""
    root = make_host(tmp_path, driver="580.65.06", libcuda="580.65.06")
    diag = diagnose(root)
    assert diag.visible
    assert "no GPU device nodes" in diag.cause and "--gpus all" in diag.cause


def test_nodes_but_driver_not_loaded(tmp_path: Path) -> None:
    root = make_host(tmp_path, nodes=ALL_NODES)
    diag = diagnose(root)
    assert diag.cause.startswith("the NVIDIA kernel driver is not loaded")
    assert "580 or newer for CUDA 13.0" in diag.cause


def test_missing_uvm_node(tmp_path: Path) -> None:
    root = make_host(
        tmp_path, driver="580.65.06", nodes=("nvidia0", "nvidiactl"), libcuda="580.65.06"
    )
    assert "nvidia-uvm" in diagnose(root).cause


def test_missing_driver_library(tmp_path: Path) -> None:
    root = make_host(tmp_path, driver="580.65.06", nodes=ALL_NODES)
    assert "libcuda.so.1 is not installed or mounted" in diagnose(root).cause


def test_kernel_and_library_versions_differ(tmp_path: Path) -> None:
    root = make_host(tmp_path, driver="580.65.06", nodes=ALL_NODES, libcuda="580.95.05")
    diag = diagnose(root)
    assert "kernel module (580.65.06)" in diag.cause and "libcuda.so.580.95.05" in diag.cause


def test_cpu_only_torch_build(tmp_path: Path) -> None:
    diag = diagnose(healthy(tmp_path), cuda=None)
    assert "CPU-only build" in diag.cause
    assert diag.required_driver is None


@pytest.mark.parametrize("value", ["", "-1"])
def test_cuda_visible_devices_hides_every_gpu(tmp_path: Path, value: str) -> None:
    diag = diagnose(healthy(tmp_path), environ={**GPU_ENV, "CUDA_VISIBLE_DEVICES": value})
    assert diag.cause == f"CUDA_VISIBLE_DEVICES={value!r} hides every GPU from CUDA"


@pytest.mark.parametrize("value", ["void", "none", ""])
def test_nvidia_visible_devices_saying_no_gpu_is_not_evidence(tmp_path: Path, value: str) -> None:
    diag = diagnose(make_host(tmp_path), environ={"NVIDIA_VISIBLE_DEVICES": value})
    assert not diag.visible and diag.cause is None


def test_environment_alone_counts_as_visible(tmp_path: Path) -> None:
    """NVIDIA_VISIBLE_DEVICES=all with nothing behind it: a GPU was asked for, none arrived."""
    diag = diagnose(make_host(tmp_path))
    assert diag.visible and diag.evidence == ("NVIDIA_VISIBLE_DEVICES=all",)
    assert "kernel driver is not loaded" in diag.problems[0]
    assert any("no GPU device nodes" in p for p in diag.problems)


def test_wsl2_host(tmp_path: Path) -> None:
    """WSL2 exposes /dev/dxg and /usr/lib/wsl/lib, no /proc/driver/nvidia and no /dev/nvidia*."""
    root = make_host(tmp_path, nodes=("dxg",), libcuda="1.1", lib_dir="usr/lib/wsl/lib")
    diag = diagnose(root, environ={})
    assert diag.visible and diag.problems == ()
    assert diag.library_path == "/usr/lib/wsl/lib/libcuda.so.1"


def test_library_found_through_ld_library_path_and_ld_so_conf(tmp_path: Path) -> None:
    root = make_host(
        tmp_path, driver="580.65.06", nodes=ALL_NODES, libcuda="580.65.06", lib_dir="opt/drv/lib"
    )
    assert "libcuda.so.1" in (diagnose(root).cause or "")
    env = {**GPU_ENV, "LD_LIBRARY_PATH": "/nowhere:/opt/drv/lib"}
    assert diagnose(root, environ=env).problems == ()
    conf = root / "etc/ld.so.conf.d"
    conf.mkdir(parents=True)
    (conf / "nvidia.conf").write_text("# driver\n/opt/drv/lib\n")
    assert diagnose(root).library_path == "/opt/drv/lib/libcuda.so.1"


def test_diagnosis_imports_no_torch() -> None:
    code = (
        "import sys, pathlib, captioner.device as m; "
        "m.diagnose_gpu(root=pathlib.Path('/'), environ={}, torch_cuda='13.0'); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("capability", "supported"),
    [
        ((7, 0), False),
        ((6, 1), False),
        ((7, 5), True),
        ((8, 0), True),
        ((8, 9), True),
        ((9, 0), True),
        ((10, 3), True),
        ((12, 1), True),
        ((11, 0), False),
    ],
)
def test_arch_support_of_the_locked_torch(capability: tuple[int, int], supported: bool) -> None:
    """torch 2.13.0+cu130 ships sm_75..sm_120: Volta (V100, 7.0) and older cannot run it."""
    arch = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
    assert arch_supported(capability, arch) is supported


def test_arch_support_rules() -> None:
    assert arch_supported((9, 0), ["sm_90a"]) and not arch_supported((9, 2), ["sm_90a"])
    assert arch_supported((13, 0), ["compute_120"]) and not arch_supported((8, 6), ["compute_90"])
    assert arch_supported((5, 0), [])  # unknown list: do not invent a problem


def test_the_locked_torch_arch_list_is_readable_without_a_gpu() -> None:
    import torch

    assert "sm_75" in model_device.torch_arch_list(torch)
