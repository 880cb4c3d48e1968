"""What the NVIDIA driver's own traces say about the GPU, read from files under a root.

`torch.cuda.is_available()` only says *whether* CUDA works. This module reads what the driver
leaves behind — `/proc/driver/nvidia/version`, `/sys/module/nvidia/version`, the `/dev/nvidia*`
nodes, the mounted `libcuda.so.*`, the NVIDIA container variables — and names the first cause
that stops CUDA (driver too old for the torch build, no device nodes, module not loaded, ...).
Root and environment are parameters, so tests give it a temporary directory with simulated
driver files. captioner/device.py turns the diagnosis into a device plan.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Oldest Linux driver per CUDA major version (minor version compatibility), from NVIDIA's
# "CUDA Compatibility" guide: 13.x >= 580, 12.x >= 525.60.13, 11.x >= 450.80.02.
MIN_DRIVER: dict[int, tuple[int, ...]] = {13: (580,), 12: (525, 60, 13), 11: (450, 80, 2)}
# Where distributions, the NVIDIA container toolkit and WSL put the driver's user-space libraries.
LIBRARY_DIRS = (
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "usr/lib64",
    "usr/lib",
    "lib/x86_64-linux-gnu",
    "lib64",
    "usr/local/nvidia/lib64",
    "usr/local/nvidia/lib",
    "usr/lib/wsl/lib",
)
_VERSION = re.compile(r"\b(\d{3,4}\.\d{1,3}(?:\.\d{1,3})?)\b")
_NO_GPUS = {"", "void", "none"}


# --------------------------------------------------------------------------- driver traces


@dataclass(frozen=True)
class GpuDiagnosis:
    """What the filesystem and environment say about an NVIDIA GPU, read without CUDA.

    `visible`: something says a GPU is meant to be used here (the container variables, device
    nodes, a loaded driver). `problems`: every reason found why CUDA cannot work, most basic first;
    `cause` is the first. Both empty when the traces look right.
    """

    visible: bool
    evidence: tuple[str, ...]
    problems: tuple[str, ...]
    kernel_driver: str | None
    kernel_driver_source: str | None
    library_driver: str | None
    library_path: str | None
    device_nodes: tuple[str, ...]
    gpu_models: tuple[str, ...]
    torch_cuda: str | None
    required_driver: str | None

    @property
    def cause(self) -> str | None:
        return self.problems[0] if self.problems else None

    @property
    def driver_version(self) -> str | None:
        return self.kernel_driver or self.library_driver


def version_tuple(version: str) -> tuple[int, ...]:
    """ "535.154.05" -> (535, 154, 5); non-numeric parts end the tuple."""
    parts: list[int] = []
    for piece in version.split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


def required_driver(torch_cuda: str | None) -> tuple[int, ...] | None:
    """The oldest NVIDIA Linux driver that runs a torch built for CUDA `torch_cuda`."""
    if not torch_cuda:
        return None
    major = version_tuple(torch_cuda)[:1]
    return MIN_DRIVER.get(major[0]) if major else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def kernel_driver_version(root: Path) -> tuple[str | None, str | None]:
    """(version, file it came from) of the loaded NVIDIA kernel module, if any."""
    for rel in ("proc/driver/nvidia/version", "sys/module/nvidia/version"):
        text = _read(root / rel)
        if text is None:
            continue
        found = _VERSION.search(text)
        if found:
            return found.group(1), "/" + rel
    return None, None


def _ld_conf_dirs(root: Path) -> list[str]:
    """Library directories named in /etc/ld.so.conf.d/*.conf (the toolkit adds its own there)."""
    dirs: list[str] = []
    conf = root / "etc" / "ld.so.conf.d"
    with contextlib.suppress(OSError):
        for path in sorted(conf.glob("*.conf")):
            for line in (_read(path) or "").splitlines():
                line = line.split("#", 1)[0].strip()
                if line.startswith("/"):
                    dirs.append(line.lstrip("/"))
    return dirs


def library_dirs(root: Path, environ: Mapping[str, str]) -> list[Path]:
    """Where the dynamic loader would look for libcuda.so.1, under `root`."""
    extra = [p.lstrip("/") for p in environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    seen: list[Path] = []
    for rel in [*extra, *_ld_conf_dirs(root), *LIBRARY_DIRS]:
        path = root / rel
        if path not in seen:
            seen.append(path)
    return seen


def find_libcuda(root: Path, environ: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(path of libcuda.so.1, driver version from its versioned file name) or Nones."""
    for directory in library_dirs(root, environ):
        soname = directory / "libcuda.so.1"
        if not (soname.is_file() or soname.is_symlink()):
            continue
        version = None
        with contextlib.suppress(OSError):
            for candidate in sorted(directory.glob("libcuda.so.*.*")):
                found = _VERSION.fullmatch(candidate.name.removeprefix("libcuda.so."))
                if found:
                    version = found.group(1)
        return "/" + soname.relative_to(root).as_posix(), version
    return None, None


def device_nodes(root: Path) -> tuple[str, ...]:
    """The NVIDIA (or WSL /dev/dxg) device nodes present under `root`/dev."""
    dev = root / "dev"
    names: list[str] = []
    with contextlib.suppress(OSError):
        names = sorted(p.name for p in dev.iterdir() if p.name.startswith(("nvidia", "dxg")))
    return tuple(f"/dev/{n}" for n in names)


def gpu_models(root: Path) -> tuple[str, ...]:
    """GPU model names from /proc/driver/nvidia/gpus/*/information (one per GPU)."""
    models: list[str] = []
    with contextlib.suppress(OSError):
        for info in sorted((root / "proc/driver/nvidia/gpus").glob("*/information")):
            for line in (_read(info) or "").splitlines():
                if line.startswith("Model:"):
                    models.append(line.split(":", 1)[1].strip())
    return tuple(models)


def _evidence(environ: Mapping[str, str], nodes: tuple[str, ...], kernel: str | None) -> list[str]:
    evidence = []
    nvidia_visible = environ.get("NVIDIA_VISIBLE_DEVICES")
    if nvidia_visible is not None and nvidia_visible.strip().lower() not in _NO_GPUS:
        evidence.append(f"NVIDIA_VISIBLE_DEVICES={nvidia_visible}")
    cuda_visible = environ.get("CUDA_VISIBLE_DEVICES")
    if cuda_visible is not None and cuda_visible.strip() not in ("", "-1"):
        evidence.append(f"CUDA_VISIBLE_DEVICES={cuda_visible}")
    gpu_nodes = [n for n in nodes if re.fullmatch(r"/dev/(nvidia\d+|nvidiactl|dxg)", n)]
    evidence += gpu_nodes
    if kernel:
        evidence.append(f"NVIDIA driver {kernel} loaded")
    return evidence


@dataclass(frozen=True)
class _Traces:
    """What one diagnosis read, handed to each check below."""

    environ: Mapping[str, str]
    torch_cuda: str | None
    torch_version: str
    kernel: str | None
    lib_path: str | None
    lib_version: str | None
    nodes: tuple[str, ...]

    @property
    def wsl(self) -> bool:
        return "/dev/dxg" in self.nodes


def _check_build(t: _Traces) -> str | None:
    if t.torch_cuda is not None:
        return None
    return (
        f"torch {t.torch_version} is a CPU-only build (torch.version.cuda is None); install the "
        "locked CUDA build (uv sync --frozen)"
    )


def _check_hidden(t: _Traces) -> str | None:
    value = t.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None or value.strip() not in ("", "-1"):
        return None
    return f"CUDA_VISIBLE_DEVICES={value!r} hides every GPU from CUDA"


def _check_loaded(t: _Traces) -> str | None:
    if t.kernel is not None or t.wsl:
        return None
    return (
        "the NVIDIA kernel driver is not loaded (no /proc/driver/nvidia/version or "
        "/sys/module/nvidia/version): install the NVIDIA driver on the host" + _needs(t.torch_cuda)
    )


def _check_age(t: _Traces) -> str | None:
    need = required_driver(t.torch_cuda)
    found = t.kernel or t.lib_version
    if not (need and found) or version_tuple(found) >= need:
        return None
    return (
        f"NVIDIA driver {found} is too old for torch {t.torch_version} (CUDA {t.torch_cuda} needs "
        f"driver {'.'.join(map(str, need))} or newer): upgrade the host driver"
    )


def _check_mismatch(t: _Traces) -> str | None:
    if not (t.kernel and t.lib_version) or version_tuple(t.kernel) == version_tuple(t.lib_version):
        return None
    return (
        f"the NVIDIA kernel module ({t.kernel}) and the driver library libcuda.so.{t.lib_version} "
        "differ (driver upgraded without a reboot, or a container holding another driver's "
        "libraries): reboot or reload the nvidia modules"
    )


def _check_nodes(t: _Traces) -> str | None:
    if t.wsl:
        return None
    if not any(re.fullmatch(r"/dev/nvidia\d+", n) for n in t.nodes):
        return (
            "no GPU device nodes (/dev/nvidia0, ...): in Docker start the container with "
            "--gpus all (NVIDIA Container Toolkit); on a host, load the driver (nvidia-modprobe)"
        )
    if "/dev/nvidia-uvm" not in t.nodes:
        return (
            "/dev/nvidia-uvm is missing: the nvidia_uvm kernel module is not loaded "
            "(sudo modprobe nvidia-uvm); CUDA cannot start without it"
        )
    return None


def _check_library(t: _Traces) -> str | None:
    if t.lib_path is not None:
        return None
    return (
        "the driver library libcuda.so.1 is not installed or mounted: in Docker use --gpus all "
        "with NVIDIA_DRIVER_CAPABILITIES including compute; on a host, reinstall the driver"
    )


# Most basic first: the first problem found is the one named as the cause.
_CHECKS = (
    _check_build,
    _check_hidden,
    _check_loaded,
    _check_age,
    _check_mismatch,
    _check_nodes,
    _check_library,
)


def _needs(torch_cuda: str | None) -> str:
    need = required_driver(torch_cuda)
    return f" ({'.'.join(map(str, need))} or newer for CUDA {torch_cuda})" if need else ""


def diagnose_gpu(
    *,
    root: Path = Path("/"),
    environ: Mapping[str, str],
    torch_cuda: str | None,
    torch_version: str = "",
) -> GpuDiagnosis:
    """Read the NVIDIA driver's traces under `root`; no CUDA call, no torch import.

    `torch_cuda` is the CUDA version torch was built for (`torch.version.cuda`, None for a
    CPU-only build).
    """
    kernel, kernel_source = kernel_driver_version(root)
    lib_path, lib_version = find_libcuda(root, environ)
    nodes = device_nodes(root)
    evidence = _evidence(environ, nodes, kernel)
    traces = _Traces(
        environ,
        torch_cuda,
        torch_version or "(unknown version)",
        kernel,
        lib_path,
        lib_version,
        nodes,
    )
    found = [check(traces) for check in _CHECKS] if evidence else []
    problems = [p for p in found if p]
    need = required_driver(torch_cuda)
    return GpuDiagnosis(
        visible=bool(evidence),
        evidence=tuple(evidence),
        problems=tuple(problems),
        kernel_driver=kernel,
        kernel_driver_source=kernel_source,
        library_driver=lib_version,
        library_path=lib_path,
        device_nodes=nodes,
        gpu_models=gpu_models(root),
        torch_cuda=torch_cuda,
        required_driver=".".join(map(str, need)) if need else None,
    )


# --------------------------------------------------------------------------- what torch can run
