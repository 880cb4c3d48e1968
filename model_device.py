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
command (model_doctor.py) all report the same `DevicePlan`, so what the service says it would do
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

log = logging.getLogger(__name__)

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
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_VERSION = re.compile(r"\b(\d{3,4}\.\d{1,3}(?:\.\d{1,3})?)\b")
_NO_GPUS = {"", "void", "none"}
FIX_HINT = "See docs/gpu.md; set DEVICE=cpu to run on the CPU on purpose."


class DeviceError(RuntimeError):
    """The configured device or precision cannot be used on this machine; the message says why."""


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
