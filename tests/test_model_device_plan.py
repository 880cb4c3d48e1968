"""captioner/device.py and captioner/doctor.py: the device plan and the doctor.

No GPU is needed: each host is a simulated one (see model_device_helpers.py). torch itself is
never faked: the plan tests use the real `torch.cuda.is_available()`, which is False on the CPU
machines these tests run on (they skip, saying so, on a CUDA host). The NVML binding is checked
against a small C library with NVML's ABI, compiled here. Last, the fp16 code path of the
Captioner runs on the CPU with the tiny model, so a dtype mistake cannot hide until a GPU appears.
The diagnosis itself is in test_model_device.py.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from captioner import device as model_device
from captioner import doctor as model_doctor
from captioner.device import DeviceError, plan_device
from model_device_helpers import GPU_ENV, healthy, make_host
from settings import Settings

ROOT = Path(__file__).resolve().parent.parent
TINY_YAML = ROOT / "models" / "tiny-shapes" / "model.yaml"


@pytest.fixture
def cpu_only_torch() -> None:
    """The plan tests need torch to find no usable CUDA, as on this project's CI machines."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is usable here, so DEVICE=auto rightly picks it: no fallback to test")


# --------------------------------------------------------------------------- the plan


def test_auto_falls_back_loudly_with_one_error(
    tmp_path: Path, cpu_only_torch: None, caplog: pytest.LogCaptureFixture
) -> None:
    root = healthy(tmp_path, "535.154.05")
    with caplog.at_level(logging.WARNING, logger="captioner.device"):
        plan = plan_device("auto", "fp32", root=root, environ=GPU_ENV)
    assert (plan.device, plan.precision) == ("cpu", "fp32")
    assert plan.degraded and len(plan.warnings) == 1
    cause = plan.diagnosis.cause
    assert cause in plan.warnings[0] and cause in plan.reason
    assert plan.warnings[0].startswith("running on the CPU, not the GPU")
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.levelname, r.getMessage()) for r in errors] == [("ERROR", plan.warnings[0])]


def test_device_cuda_fails_at_start_with_the_same_cause(
    tmp_path: Path, cpu_only_torch: None
) -> None:
    root = healthy(tmp_path, "535.154.05")
    auto = plan_device(None, "fp32", root=root, environ=GPU_ENV, report=False)
    for requested in ("cuda", "cuda:0", "CUDA:1"):
        with pytest.raises(DeviceError) as err:
            plan_device(requested, "fp16", root=root, environ=GPU_ENV)
        assert str(err.value).startswith(f"DEVICE={requested.lower()} but CUDA cannot be used: ")
        assert str(err.value).endswith(auto.diagnosis.cause)


def test_no_gpu_at_all_is_a_quiet_cpu_choice(
    tmp_path: Path, cpu_only_torch: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="captioner.device"):
        plan = plan_device(None, "auto", root=make_host(tmp_path), environ={})
    assert (plan.device, plan.precision, plan.warnings) == ("cpu", "fp32", ())
    assert "no NVIDIA GPU is visible" in plan.reason
    assert caplog.records == []
    with pytest.raises(DeviceError, match="CUDA cannot be used: no NVIDIA GPU is visible"):
        plan_device("cuda", "fp32", root=make_host(tmp_path / "b"), environ={})


def test_explicit_cpu_is_not_a_fallback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="captioner.device"):
        plan = plan_device("cpu", "fp32", root=healthy(tmp_path, "535.154.05"), environ=GPU_ENV)
    assert (plan.device, plan.warnings, plan.reason) == (
        "cpu",
        (),
        "DEVICE=cpu; PRECISION=fp32 (captions identical to the reference)",
    )
    assert caplog.records == []


def test_report_false_logs_nothing(
    tmp_path: Path, cpu_only_torch: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="captioner.device"):
        plan = plan_device(
            "auto", "fp32", root=healthy(tmp_path, "535.154.05"), environ=GPU_ENV, report=False
        )
    assert plan.degraded and caplog.records == []


def test_auto_with_fp16_names_why_the_gpu_was_not_chosen(
    tmp_path: Path, cpu_only_torch: None
) -> None:
    with pytest.raises(DeviceError) as err:
        plan_device("auto", "fp16", root=healthy(tmp_path, "535.154.05"), environ=GPU_ENV)
    assert "PRECISION=fp16 needs a CUDA device" in str(err.value)
    assert "DEVICE=auto fell back to the CPU: NVIDIA driver 535.154.05 is too old" in str(err.value)


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cuda:", "tpu", "cpu0"])
def test_malformed_device_is_refused(bad: str) -> None:
    with pytest.raises(DeviceError, match="DEVICE must be auto, cpu, cuda or cuda:N"):
        plan_device(bad, "fp32")


def test_precision_rules_on_the_cpu() -> None:
    import torch

    choose = model_device.choose_precision
    assert choose("auto", "cpu", torch)[0] == "fp32"
    assert choose("fp32", "cpu", torch)[0] == "fp32"
    with pytest.raises(DeviceError, match="PRECISION=fp16 needs a CUDA device"):
        choose("fp16", "cpu", torch)
    with pytest.raises(DeviceError, match="PRECISION must be"):
        choose("fp8", "cpu", torch)
    if model_device.cpu_supports_bf16():
        assert choose("bf16", "cpu", torch)[0] == "bf16"
    else:
        with pytest.raises(DeviceError, match="not supported by this CPU"):
            choose("bf16", "cpu", torch)


def test_older_api_still_answers(cpu_only_torch: None) -> None:
    assert model_device.resolve_device("cpu") == "cpu"
    assert model_device.resolve_device(None) == "cpu"
    assert model_device.resolve_precision("auto", "cpu") == "fp32"
    assert model_device.expected_device(" CUDA:1") == "cuda"
    assert model_device.expected_device(None) == "cpu"


# --------------------------------------------------------------------------- doctor


def run_doctor(
    capsys: pytest.CaptureFixture[str], root: Path, environ: dict[str, str], *argv: str
) -> tuple[int, str]:
    status = model_doctor.main(
        list(argv), settings=Settings(), root=root, environ=environ, nvml_library=None
    )
    return status, capsys.readouterr().out


def test_doctor_on_an_old_driver_host(
    tmp_path: Path, cpu_only_torch: None, capsys: pytest.CaptureFixture[str]
) -> None:
    root = healthy(tmp_path, "535.154.05", gpu_model="NVIDIA A10G")
    shutil.copy("/proc/cpuinfo", root / "proc/cpuinfo")
    status, out = run_doctor(capsys, root, GPU_ENV)
    assert status == model_doctor.EXIT_DEGRADED
    assert "kernel module 535.154.05 (from /proc/driver/nvidia/version)" in out
    assert "needs NVIDIA driver 580 or newer" in out
    assert "NVIDIA A10G" in out
    assert "DEGRADED (GPU visible, running on the CPU), exit status 2" in out
    status, out = run_doctor(capsys, root, GPU_ENV, "--device", "cuda")
    assert status == model_doctor.EXIT_UNUSABLE
    assert "CANNOT START: DEVICE=cuda but CUDA cannot be used: NVIDIA driver 535.154.05" in out
    status, out = run_doctor(capsys, root, GPU_ENV, "--device", "cpu")
    assert status == model_doctor.EXIT_OK and "device cpu, precision fp32" in out


def test_doctor_json_without_a_gpu(
    tmp_path: Path, cpu_only_torch: None, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_host(tmp_path)
    (root / "proc").mkdir()
    (root / "proc/cpuinfo").write_text(
        "processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 avx2 avx512f amx_tile\n"
    )
    status, out = run_doctor(capsys, root, {}, "--json", "--precision", "auto")
    report = json.loads(out)
    assert status == 0 and report["exit_status"] == 0
    assert (report["device"], report["precision"], report["warnings"]) == ("cpu", "fp32", [])
    assert report["cpu"]["model"] == "Test CPU"
    assert report["cpu"]["features"]["AVX-512"] and report["cpu"]["features"]["AMX"]
    assert not report["cpu"]["features"]["AVX-512 BF16"]
    assert report["torch"]["cuda"] == "13.0" and report["diagnosis"]["visible"] is False
    assert report["check"].startswith("fp32 matrix product on cpu: ok")


def test_doctor_on_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    """The real report: whatever the host, it must agree with what the service would choose."""
    import torch

    status = model_doctor.main(["--json"], settings=Settings())
    report = json.loads(capsys.readouterr().out)
    plan = plan_device(None, "fp32", report=False)
    assert (report["device"], report["precision"]) == (plan.device, plan.precision)
    assert status == (2 if plan.degraded else 0)
    assert report["torch"]["version"] == torch.__version__
    assert report["torch"]["cuda_available"] == torch.cuda.is_available()


# --------------------------------------------------------------------------- NVML binding

FAKE_NVML = r"""
#include <string.h>
typedef struct { unsigned long long total, free, used; } mem_t;
static int init_rc = INIT_RC;
int nvmlInit_v2(void) { return init_rc; }
int nvmlShutdown(void) { return 0; }
const char *nvmlErrorString(int rc) { return rc == 9 ? "Driver Not Loaded" : "Unknown Error"; }
int nvmlSystemGetDriverVersion(char *v, unsigned int n) { strncpy(v, "535.154.05", n); return 0; }
int nvmlSystemGetCudaDriverVersion_v2(int *v) { *v = 12020; return 0; }
int nvmlDeviceGetCount_v2(unsigned int *n) { *n = 2; return 0; }
int nvmlDeviceGetHandleByIndex_v2(unsigned int i, void **h) {
    *h = (void *)(long)(i + 1); return 0; }
int nvmlDeviceGetName(void *h, char *name, unsigned int n) {
    strncpy(name, (long)h == 1 ? "NVIDIA A10G" : "Tesla V100-SXM2-16GB", n); return 0; }
int nvmlDeviceGetMemoryInfo(void *h, mem_t *m) {
    m->total = 24ULL << 30; m->free = 20ULL << 30; m->used = 4ULL << 30; return 0; }
int nvmlDeviceGetCudaComputeCapability(void *h, int *major, int *minor) {
    *major = (long)h == 1 ? 8 : 7; *minor = (long)h == 1 ? 6 : 0; return 0; }
"""


def build_fake_nvml(tmp_path: Path, init_rc: int) -> str:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.fail("no C compiler to build the NVML-ABI test library (make test installs gcc)")
    source = tmp_path / "nvml.c"
    source.write_text(FAKE_NVML.replace("INIT_RC", str(init_rc)))
    library = tmp_path / f"libnvidia-ml-{init_rc}.so.1"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True, timeout=60
    )
    return str(library)


def test_nvml_binding_reads_driver_and_gpus(tmp_path: Path) -> None:
    report = model_doctor.nvml_query(build_fake_nvml(tmp_path, 0))
    assert report.error is None
    assert (report.driver_version, report.cuda_driver_version) == ("535.154.05", "12.2")
    assert [(g.name, g.capability, g.memory_total_gib) for g in report.gpus] == [
        ("NVIDIA A10G", "8.6", 24.0),
        ("Tesla V100-SXM2-16GB", "7.0", 24.0),
    ]


def test_nvml_errors_are_reported_not_raised(tmp_path: Path) -> None:
    report = model_doctor.nvml_query(build_fake_nvml(tmp_path, 9))
    assert report.error == "nvmlInit_v2: Driver Not Loaded (NVML error 9)"
    missing = model_doctor.nvml_query(str(tmp_path / "libnvidia-ml-absent.so.1"))
    assert missing.error and "libnvidia-ml-absent.so.1" in missing.error


# --------------------------------------------------------------------------- fp16 on the CPU


@pytest.fixture
def one_thread() -> Any:
    """One intra-op thread while the model runs: on the shared 2-core machine small ops with
    2 OpenMP threads wait for a descheduled peer (see tests/test_fast_decode.py)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif(not TINY_YAML.is_file(), reason=f"tiny-shapes model absent: {TINY_YAML}")
def test_fp16_code_path_runs_on_the_cpu(tiny_captioner: Any, one_thread: None) -> None:
    """torch 2.13 runs fp16 weights under CPU autocast, so the service's fp16 path (weights
    converted once, autocast, fused attention, fast decoder) is exercised here with the tiny
    model; its captions agree with fp32's. A fresh model: conversion is in place."""
    import torch

    import blip2_model

    sys.path.insert(0, str(ROOT / "scripts"))
    import tiny_shapes

    spec = blip2_model.yaml_spec(TINY_YAML)
    model = blip2_model.build_model(spec)
    blip2_model.load_checkpoint(model, spec.checkpoint)
    fp16 = blip2_model.Captioner(model, spec, device="cpu", precision="fp16")
    assert {p.dtype for p in fp16.model.parameters()} == {torch.float16}
    rng = random.Random(11)
    samples = [tiny_shapes.sample(rng) for _ in range(24)]
    images = [img for img, _ in samples]
    want = tiny_captioner.caption(images)
    got = fp16.caption(images)
    same = sum(a == b for a, b in zip(got, want, strict=True))
    assert same >= 0.95 * len(images), f"fp16 agrees with fp32 on {same}/{len(images)}"
    assert sum(g[0] == truth for g, (_, truth) in zip(got, samples, strict=True)) >= 20
    assert fp16.caption(images[:3]) == got[:3]  # batch size does not change fp16 captions here
