"""`python blip2_model.py doctor`: what this machine can run the model on, and why.

The first time a GPU host is at hand, one command should tell whether the service will use it:
the torch build and the CUDA version it needs, the NVIDIA driver found (from the driver's own
files, or NVML through ctypes; no nvidia-smi needed), each GPU with its compute capability and
memory, fp16/bf16 support, the CPU's features, and the device and precision the service would
choose with the current settings, and why (model_device.plan_device, the same call the service
makes). A small matrix product on the chosen device proves that kernels really run there.

Exit status: 0 the configured device works; 1 it cannot be used (DEVICE=cuda without usable
CUDA, an impossible PRECISION, or the compute check failed); 2 DEVICE=auto fell back to the CPU
although a GPU is visible (the service would run, about 17x slower).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner import cpu_bf16
from captioner import device as model_device
from captioner.memory import model_table
from captioner.nvml import NVML_LIBRARY, NvmlReport, nvml_query

if TYPE_CHECKING:
    from settings import Settings

EXIT_OK, EXIT_UNUSABLE, EXIT_DEGRADED = 0, 1, 2
GIB = 1024**3
# CPU flags (as /proc/cpuinfo spells them) that decide how fast the CPU path is.
CPU_FLAGS = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_bf16": "AVX-512 BF16",
    "avx512_fp16": "AVX-512 FP16",
    "amx_tile": "AMX",
    "amx_bf16": "AMX BF16",
    "amx_fp16": "AMX FP16",
}
# Largest relative error of a 256x256 matrix product against fp32, per precision.
CHECK_TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 5e-2}


# --------------------------------------------------------------------------- CPU and torch


@dataclass
class CpuReport:
    model: str
    cores: int
    features: dict[str, bool]
    torch_capability: str
    onednn_bf16: bool
    torch_threads: int


def cpu_flags(root: Path) -> tuple[str, set[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo under `root`."""
    model, flags = "unknown CPU", set()
    with contextlib.suppress(OSError):
        for line in (root / "proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return model, flags


def usable_cores() -> int:
    """Cores this process may run on (a container's CPU set), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_report(root: Path, torch: Any) -> CpuReport:
    model, flags = cpu_flags(root)
    return CpuReport(
        model=model,
        cores=usable_cores(),
        features={label: flag in flags for flag, label in CPU_FLAGS.items()},
        torch_capability=str(torch.backends.cpu.get_cpu_capability()),
        onednn_bf16=model_device.cpu_supports_bf16(),
        torch_threads=torch.get_num_threads(),
    )


@dataclass
class TorchReport:
    version: str
    cuda: str | None
    cudnn: str | None
    arch_list: list[str]
    cuda_available: bool
    device_count: int
    init_warning: str | None


def torch_report(torch: Any) -> TorchReport:
    state = model_device.cuda_state(torch)
    cudnn = None
    with contextlib.suppress(Exception):
        raw = torch.backends.cudnn.version()
        if raw:
            cudnn = f"{raw // 10000}.{raw % 10000 // 100}.{raw % 100}"
    return TorchReport(
        version=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=cudnn,
        arch_list=model_device.torch_arch_list(torch),
        cuda_available=state.available,
        device_count=state.device_count,
        init_warning=state.torch_warning,
    )


@dataclass
class GpuReport:
    device: str
    name: str
    capability: str
    memory_total_gib: float
    memory_free_gib: float
    fp16: bool
    bf16: bool
    kernels_in_torch: bool


def gpu_reports(torch: Any, count: int) -> list[GpuReport]:
    """Every CUDA device torch sees (only called when CUDA is available)."""
    arch_list = model_device.torch_arch_list(torch)
    out = []
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        capability = (props.major, props.minor)
        free, total = torch.cuda.mem_get_info(index)
        out.append(
            GpuReport(
                device=f"cuda:{index}",
                name=props.name,
                capability=f"{props.major}.{props.minor}",
                memory_total_gib=round(total / GIB, 2),
                memory_free_gib=round(free / GIB, 2),
                fp16=capability >= (5, 3),
                bf16=capability >= (8, 0),
                kernels_in_torch=model_device.arch_supported(capability, arch_list),
            )
        )
    return out


def compute_check(torch: Any, device: str, precision: str) -> tuple[bool, str]:
    """Run a 256x256 matrix product in `precision` on `device` and compare it with fp32."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(256, 256, generator=gen)
        b = torch.randn(256, 256, generator=gen)
        want = (a.double() @ b.double()).float()
        got = (a.to(device, dtype) @ b.to(device, dtype)).float().cpu()
        error = float((got - want).abs().max() / want.abs().max())
    except Exception as exc:  # "no kernel image is available", driver errors, ...
        return False, f"{precision} matrix product on {device} failed: {type(exc).__name__}: {exc}"
    ok = error <= CHECK_TOLERANCE[precision]
    verdict = "ok" if ok else f"TOO INACCURATE (limit {CHECK_TOLERANCE[precision]:.0e})"
    return ok, f"{precision} matrix product on {device}: {verdict}, relative error {error:.1e}"


# --------------------------------------------------------------------------- the report


@dataclass
class DoctorReport:
    torch: TorchReport
    diagnosis: dict[str, Any]
    nvml: NvmlReport | None
    gpus: list[GpuReport]
    cpu: CpuReport
    environment: dict[str, str | None]
    settings: dict[str, str]
    device: str | None = None
    precision: str | None = None
    reason: str | None = None
    warnings: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)  # speed notes; the exit status ignores them
    error: str | None = None
    check: str | None = None
    models: list[dict[str, Any]] = field(default_factory=list)  # memory each model needs
    exit_status: int = EXIT_OK


def collect(
    settings: Settings,
    *,
    root: Path,
    environ: Mapping[str, str],
    nvml_library: str | None,
    bf16_speedup: Callable[[], float] = cpu_bf16.bf16_speedup,
) -> DoctorReport:
    """Everything the doctor prints, and the exit status, as data."""
    import torch

    tr = torch_report(torch)
    plan_error, plan = None, None
    try:
        plan = model_device.plan_device(
            settings.device, settings.precision, root=root, environ=environ, report=False
        )
    except model_device.DeviceError as exc:
        plan_error = str(exc)
    except Exception as exc:  # a CUDA error the plan did not foresee: report, do not crash
        plan_error = f"unexpected {type(exc).__name__} while planning: {exc}"
    diag = model_device.diagnose_gpu(
        root=root, environ=environ, torch_cuda=tr.cuda, torch_version=tr.version
    )
    report = DoctorReport(
        torch=tr,
        diagnosis=asdict(diag),
        nvml=nvml_query(nvml_library) if nvml_library else None,
        gpus=gpu_reports(torch, tr.device_count) if tr.cuda_available else [],
        cpu=cpu_report(root, torch),
        environment={
            k: environ.get(k)
            for k in (
                "NVIDIA_VISIBLE_DEVICES",
                "CUDA_VISIBLE_DEVICES",
                "NVIDIA_DRIVER_CAPABILITIES",
            )
        },
        settings={"DEVICE": settings.device or "auto", "PRECISION": settings.precision},
        error=plan_error,
    )
    if plan is None:
        report.exit_status = EXIT_UNUSABLE
        return report
    report.device, report.precision, report.reason = plan.device, plan.precision, plan.reason
    report.warnings = list(plan.warnings)
    ok, report.check = compute_check(torch, plan.device, plan.precision)
    note = cpu_bf16.check(plan.device, plan.precision, bf16_speedup)
    report.advice = [note] if note else []
    report.models = model_table(settings, plan.device, plan.precision, root)
    configured = report.models[0]
    if configured.get("fits") is False:
        report.warnings.append(
            f"the configured model {configured['model']} does not fit: it needs about "
            f"{configured['needed_gib']} GiB, {configured['available_gib']} GiB is available; "
            "the service would refuse to start"
        )
        ok = False
    if not ok:
        report.exit_status = EXIT_UNUSABLE
    elif plan.degraded:
        report.exit_status = EXIT_DEGRADED
    return report


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _driver_lines(report: DoctorReport) -> list[str]:
    d = report.diagnosis
    kernel = (
        f"{d['kernel_driver']} (from {d['kernel_driver_source']})"
        if d["kernel_driver"]
        else "not loaded (no /proc/driver/nvidia/version, /sys/module/nvidia/version)"
    )
    library = (
        f"{d['library_path']}" + (f" (driver {d['library_driver']})" if d["library_driver"] else "")
        if d["library_path"]
        else "not found"
    )
    lines = [f"kernel module {kernel}", f"libcuda.so.1  {library}"]
    nvml = report.nvml
    if nvml is None:
        lines.append("NVML          not asked")
    elif nvml.driver_version:
        lines.append(
            f"NVML          driver {nvml.driver_version}, supports CUDA up to "
            f"{nvml.cuda_driver_version}, {len(nvml.gpus)} GPU(s)"
            + (f"; {nvml.error}" if nvml.error else "")
        )
    else:
        lines.append(f"NVML          {nvml.error}")
    return lines


def _gpu_lines(report: DoctorReport) -> list[str]:
    if report.gpus:
        return [
            f"{g.device}  {g.name}, compute capability {g.capability}, "
            f"{g.memory_total_gib:.1f} GiB ({g.memory_free_gib:.1f} free), fp16 {_yes(g.fp16)}, "
            f"bf16 {_yes(g.bf16)}, kernels in this torch build {_yes(g.kernels_in_torch)}"
            for g in report.gpus
        ]
    if report.nvml and report.nvml.gpus:
        return [
            f"GPU {g.index} (NVML; CUDA unusable)  {g.name}, compute capability {g.capability}, "
            f"{g.memory_total_gib:.1f} GiB"
            for g in report.nvml.gpus
        ]
    models = report.diagnosis["gpu_models"]
    if models:
        return [f"GPU (driver file; CUDA unusable)  {m}" for m in models]
    return ["none"]


def _cpu_lines(cpu: CpuReport) -> list[str]:
    features = ", ".join(f"{name} {_yes(have)}" for name, have in cpu.features.items())
    return [
        f"{cpu.model}, {cpu.cores} core(s) usable",
        features,
        f"torch CPU kernels {cpu.torch_capability}, oneDNN bf16 {_yes(cpu.onednn_bf16)}, "
        f"torch threads {cpu.torch_threads}",
    ]


def _section(title: str, lines: list[str]) -> list[str]:
    pad = " " * 14
    return [f"{title:<14}{lines[0]}", *(pad + line for line in lines[1:])]


def render(report: DoctorReport) -> str:
    """The human-readable report."""
    t, d = report.torch, report.diagnosis
    build = f"built for CUDA {t.cuda}" if t.cuda else "CPU-only build"
    torch_lines = [f"{t.version}, {build}" + (f", cuDNN {t.cudnn}" if t.cudnn else "")]
    if t.arch_list:
        torch_lines.append(f"GPU kernels for {' '.join(t.arch_list)}")
    if d["required_driver"]:
        torch_lines.append(f"needs NVIDIA driver {d['required_driver']} or newer")
    env = "; ".join(
        f"{k}={v}" if v is not None else f"{k} unset" for k, v in report.environment.items()
    )
    cuda = [f"torch.cuda.is_available() = {t.cuda_available}, {t.device_count} device(s)"]
    if t.init_warning:
        cuda.append(f"torch warned: {t.init_warning}")
    problems = [*d["problems"]] or ["none found" if d["visible"] else "not checked: no GPU visible"]
    lines = ["BLIP2 caption service: device doctor", ""]
    lines += _section("torch", torch_lines)
    lines += _section("driver", _driver_lines(report))
    lines += _section("environment", [env])
    lines += _section("device nodes", [" ".join(d["device_nodes"]) or "none"])
    lines += _section(
        "GPU visible",
        [f"{_yes(d['visible'])}" + (f": {', '.join(d['evidence'])}" if d["evidence"] else "")],
    )
    lines += _section("CUDA", cuda)
    lines += _section("GPUs", _gpu_lines(report))
    lines += _section("CPU", _cpu_lines(report.cpu))
    lines += _section("GPU problems", problems)
    lines += [""]
    lines += _section(
        "settings", [f"DEVICE={report.settings['DEVICE']} PRECISION={report.settings['PRECISION']}"]
    )
    lines += _section("model memory", _memory_lines(report))
    lines += _section("decision", _decision_lines(report))
    return "\n".join(lines)


def _memory_lines(report: DoctorReport) -> list[str]:
    lines = []
    for row in report.models:
        mark = " (configured)" if row["configured"] else ""
        if "error" in row:
            lines.append(f"{row['model']}{mark}: cannot tell: {row['error']}")
            continue
        have = "unknown" if row["available_gib"] is None else f"{row['available_gib']} GiB"
        verdict = "fits" if row["fits"] else "DOES NOT FIT"
        lines.append(
            f"{row['model']}{mark}: {row['parameters'] / 1e9:.3g} B parameters, needs "
            f"{row['needed_gib']} GiB in {row['precision']}, {have} {row['where']}: {verdict}"
        )
    return lines or ["not checked: no usable device"]


def _decision_lines(report: DoctorReport) -> list[str]:
    if report.error:
        return [f"CANNOT START: {report.error}", f"exit status {report.exit_status}"]
    lines = [f"device {report.device}, precision {report.precision}", f"why: {report.reason}"]
    lines += [f"WARNING: {w}" for w in report.warnings]
    lines += [f"ADVICE: {a}" for a in report.advice]
    lines.append(f"check: {report.check}")
    verdict = {
        EXIT_OK: "OK",
        EXIT_UNUSABLE: "FAILED",
        EXIT_DEGRADED: "DEGRADED (GPU visible, running on the CPU)",
    }[report.exit_status]
    lines.append(f"{verdict}, exit status {report.exit_status}")
    return lines


def main(
    argv: Sequence[str] | None = None,
    *,
    settings: Settings | None = None,
    root: Path = Path("/"),
    environ: Mapping[str, str] | None = None,
    nvml_library: str | None = NVML_LIBRARY,
) -> int:
    """Print the report (text, or JSON with --json); return the exit status."""
    parser = argparse.ArgumentParser(
        prog="blip2_model.py doctor", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--device", help="check this DEVICE instead of the configured one")
    parser.add_argument("--precision", help="check this PRECISION instead of the configured one")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if settings is None:
        from settings import Settings

        settings = Settings.from_env()
    overrides = {k: v for k, v in (("device", args.device), ("precision", args.precision)) if v}
    settings = settings.with_overrides(**overrides)
    report = collect(
        settings,
        root=root,
        environ=os.environ if environ is None else environ,
        nvml_library=nvml_library,
    )
    print(json.dumps(asdict(report), indent=2) if args.json else render(report))
    return report.exit_status


if __name__ == "__main__":
    raise SystemExit(main())
