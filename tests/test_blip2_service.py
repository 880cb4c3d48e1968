"""BLIP-2 through the whole service: the same routes, envelope, batching, cache, jobs, CLI and
Ray as BLIP v1, on the tiny trained BLIP-2 (models/tiny-blip2, LAVIS's own Blip2OPT classes).

Also the parts that choose and fetch a model: MODEL_NAME/MODEL_TYPE dispatch for every zoo
BLIP-2, the download command against a real local HTTP server standing in for the hub and the
LAVIS bucket, the named error when files are missing, and the memory refusal.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests
from test_batch import analyze, analyze_predictions, images
from test_cli import cli_env, emoji_store, expected_predictions, make_folder, read_lines, run_cli
from test_jobs import created, lines, submit, wait_state
from test_ray import require_ray_group

from http_api.envelope import FRAMEWORK

ROOT = Path(__file__).resolve().parent.parent
BLIP2_YAML = ROOT / "models" / "tiny-blip2" / "model.yaml"
TIMEOUT = 60


@pytest.fixture(scope="module")
def tiny_blip2():
    """The tiny BLIP-2 as the service loads it: through the facade, by MODEL_CONFIG's arch."""
    from blip2_model import Captioner
    from settings import Settings

    return Captioner.load(Settings().with_overrides(model_config=BLIP2_YAML, device="cpu"))


@pytest.fixture
def blip2_settings(base_settings):
    return base_settings.with_overrides(model_config=BLIP2_YAML, batch_wait_ms=200)


def _decoded(data: bytes):
    from image_input.decode import decode_image

    return decode_image(data, max_pixels=40_000_000)


# --------------------------------------------------------------------------- choosing a model


def test_the_facade_loads_blip2_by_the_yaml_arch(tiny_blip2, tiny_captioner) -> None:
    from captioner.blip2_captioner import Blip2Captioner

    assert isinstance(tiny_blip2, Blip2Captioner)
    about = tiny_blip2.describe()
    assert about["name"] == "tiny-blip2" and about["arch"] == "blip2_opt"
    assert about["precision"] == "fp32" and about["parameters"] == 1_495_168
    assert tiny_captioner.describe()["arch"] == "blip_caption"
    # The result cache is keyed by the model: the two never share an entry.
    assert tiny_blip2.identity.split("|")[0] == "tiny-blip2"
    assert tiny_blip2.identity != tiny_captioner.identity


@pytest.mark.parametrize(
    ("name", "model_type", "hub_id", "checkpoint"),
    [
        ("blip2_opt", "caption_coco_opt2.7b", "facebook/opt-2.7b", "blip2_caption_opt2.7b.pth"),
        ("blip2_opt", "caption_coco_opt6.7b", "facebook/opt-6.7b", "blip2_caption_opt6.7b.pth"),
        ("blip2_t5", "caption_coco_flant5xl", "google/flan-t5-xl", "blip2_caption_flant5xl.pth"),
    ],
)
def test_zoo_names_pick_the_blip2_family(tmp_path, name, model_type, hub_id, checkpoint) -> None:
    from captioner.blip2_spec import Blip2Spec
    from captioner.files import zoo_spec
    from settings import Settings

    spec = zoo_spec(
        Settings().with_overrides(model_name=name, model_type=model_type, model_dir=tmp_path)
    )
    assert isinstance(spec, Blip2Spec) and spec.arch == name
    assert spec.lm_dir == tmp_path / hub_id and spec.checkpoint == tmp_path / checkpoint
    assert spec.name == f"{name}/{model_type}"


def test_unknown_or_mismatched_zoo_names_are_named(tmp_path) -> None:
    from captioner.files import zoo_spec
    from captioner.spec import ModelError
    from settings import Settings

    base = Settings().with_overrides(model_dir=tmp_path)
    with pytest.raises(ModelError, match="caption_coco_opt2.7b"):
        zoo_spec(base.with_overrides(model_name="blip2_opt", model_type="large_coco"))
    with pytest.raises(ModelError, match="does not belong"):
        zoo_spec(base.with_overrides(model_name="blip2_t5", model_type="caption_coco_opt2.7b"))


# --------------------------------------------------------------------------- files, offline


def _serve_zoo_files(http_server, settings) -> dict[str, bytes]:
    """Every file caption_coco_opt2.7b needs, served by a local stand-in for the hub and the
    LAVIS bucket (small stand-in contents; the download does not look inside)."""
    from captioner.files import model_files, zoo_spec

    served: dict[str, bytes] = {}
    for url, dest in model_files(zoo_spec(settings), settings):
        rel = dest.relative_to(settings.model_dir).as_posix()
        body = hashlib.sha256(rel.encode()).digest() * 64
        http_server.set(
            url.removeprefix(http_server.url("")),
            body,
            headers={"Content-Type": "application/octet-stream"},
        )
        served[rel] = body
    return served


def test_download_fetches_every_blip2_file_with_sha256_then_nothing(tmp_path, http_server) -> None:
    from settings import Settings

    env = {
        "MODEL_NAME": "blip2_opt",
        "MODEL_TYPE": "caption_coco_opt2.7b",
        "MODEL_DIR": str(tmp_path / "models"),
        "HF_ENDPOINT": http_server.url("/hub"),
        "BLIP2_CHECKPOINT_BASE_URL": http_server.url("/bucket"),
        "TOKENIZER_URL": http_server.url("/hub/bert-base-uncased/resolve/main/"),
        "PATH": "/usr/bin:/bin",
    }
    settings = Settings.from_env(env, dotenv_path=None)
    served = _serve_zoo_files(http_server, settings)
    assert len(served) == 10  # bert x3, OPT config/tokenizer x5 and weights, the caption file
    cmd = [sys.executable, str(ROOT / "blip2_model.py"), "download"]
    first = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    sums = {}
    for line in (tmp_path / "models" / "SHA256SUMS").read_text().splitlines():
        sha, rel = line.split()
        sums[rel] = sha
    assert sums == {rel: hashlib.sha256(body).hexdigest() for rel, body in served.items()}
    for rel, body in served.items():
        assert (tmp_path / "models" / rel).read_bytes() == body
    assert "model files are complete" in first.stdout
    fetched = len(http_server.seen)
    again = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and len(http_server.seen) == fetched  # no network the 2nd time


def test_missing_blip2_files_are_named_with_the_command(tmp_path) -> None:
    from captioner.files import configured_spec
    from captioner.spec import ModelFilesMissing
    from settings import Settings

    settings = Settings().with_overrides(
        model_name="blip2_opt",
        model_type="caption_coco_opt2.7b",
        model_dir=tmp_path,
        model_download=False,
    )
    with pytest.raises(ModelFilesMissing) as info:
        configured_spec(settings)
    text = str(info.value)
    assert str(tmp_path / "facebook/opt-2.7b/pytorch_model.bin") in text
    assert str(tmp_path / "blip2_caption_opt2.7b.pth") in text
    assert (
        "MODEL_NAME=blip2_opt MODEL_TYPE=caption_coco_opt2.7b python blip2_model.py download"
        in text
    )


def test_a_model_that_cannot_fit_is_refused_with_the_numbers(tmp_path) -> None:
    from captioner import memory
    from captioner.files import zoo_spec
    from captioner.spec import ModelError
    from settings import Settings

    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal: 33554432 kB\nMemAvailable: 12582912 kB\n")
    settings = Settings().with_overrides(
        model_name="blip2_opt", model_type="caption_coco_opt2.7b", model_dir=tmp_path
    )
    spec = zoo_spec(settings)
    with pytest.raises(ModelError) as info:
        memory.check_fits(spec, "cpu", "fp32", root=tmp_path)
    text = str(info.value)
    assert "needs about 16.0 GiB" in text and "has 12.0 GiB (MemAvailable)" in text
    assert "PRECISION=bf16" in text
    assert memory.check_fits(spec, "cpu", "bf16", root=tmp_path).fits  # 8.0 GiB fits in 12
    table = memory.model_table(settings, "cpu", "fp32", root=tmp_path)
    assert table[0]["configured"] and table[0]["fits"] is False
    assert {row["model"] for row in table} == set(memory.ZOO_PARAMETERS)


# --------------------------------------------------------------------------- over HTTP


def test_http_serves_blip2_with_the_same_envelope(
    serve_app, blip2_settings, tiny_blip2, tmp_path
) -> None:
    from captioning.predictions import predictions

    server = serve_app(blip2_settings, captioner=tiny_blip2)
    data = images(1, seed=3)[0]
    expected = tiny_blip2.caption([_decoded(data)])[0][0]
    # The same prediction entries (emoji mappings included) as BLIP v1's, for this caption.
    assert analyze_predictions(server.url, data) == predictions(
        [expected], emoji_store(tmp_path).mapper
    )
    resp = requests.post(
        server.url + "/v3/analyze", files={"file": ("x.png", data, "image/png")}, timeout=TIMEOUT
    )
    body = resp.json()
    assert set(body) == {"metadata", "predictions", "service", "status"}
    assert body["metadata"]["model_info"] == {"framework": FRAMEWORK}  # the contract's, unchanged
    # What was loaded: /health's model block, /metrics, OpenAPI.
    model = requests.get(server.url + "/health", timeout=TIMEOUT).json()["model"]
    assert model["name"] == "tiny-blip2" and model["arch"] == "blip2_opt"
    assert model["parameters"] == tiny_blip2.parameters and model["precision"] == "fp32"
    metrics = requests.get(server.url + "/metrics", timeout=TIMEOUT).text
    assert 'blip2_model_info{arch="blip2_opt"' in metrics and 'name="tiny-blip2"' in metrics
    assert "blip2_model_parameters 1.495168e+06" in metrics
    info = requests.get(server.url + "/openapi.json", timeout=TIMEOUT).json()["info"]
    assert info["x-model"] == "tiny-blip2" and "`tiny-blip2`" in info["description"]
    # Options mean what they mean for BLIP-2, checked at the door with a 400.
    bad = requests.get(
        server.url + "/v3/analyze",
        params={"num_captions": "4", "num_beams": "2"},
        timeout=TIMEOUT,
    )
    assert bad.status_code == 400
    two = analyze_predictions(server.url, data, num_captions="2", num_beams="3")
    assert len(two) == 2


def test_concurrent_requests_batch_and_equal_single_captions(
    serve_app, blip2_settings, tiny_blip2
) -> None:
    server = serve_app(blip2_settings.with_overrides(cache_size=0), captioner=tiny_blip2)
    data = images(8, seed=17)
    single = [tiny_blip2.caption([_decoded(d)])[0][0] for d in data]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda d: analyze(server.url, d), data))
    assert got == [s.strip().capitalize() for s in single]
    metrics = requests.get(server.url + "/metrics", timeout=TIMEOUT).text
    sizes = [ln for ln in metrics.splitlines() if ln.startswith("blip2_model_batch_size_sum")]
    count = [ln for ln in metrics.splitlines() if ln.startswith("blip2_model_batch_size_count")]
    images_run, batches = float(sizes[0].split()[-1]), float(count[0].split()[-1])
    assert images_run >= 8 and batches < images_run  # at least one batch held several images


def test_jobs_run_on_blip2(serve_app, blip2_settings, tiny_blip2, tmp_path) -> None:
    server = serve_app(
        blip2_settings.with_overrides(cache_size=0, jobs_dir=tmp_path / "jobs"),
        captioner=tiny_blip2,
    )
    data = images(5, seed=29)
    job_id = created(submit(server.url, [(f"p{i}.png", d) for i, d in enumerate(data)]))
    wait_state(server.url, job_id, {"done"}, timeout=120)
    streamed = lines(server.url, job_id)
    assert [s["status"] for s in streamed] == ["success"] * 5
    assert [s["predictions"][0]["text"] for s in streamed] == [analyze(server.url, d) for d in data]


# --------------------------------------------------------------------------- CLI and Ray


def test_cli_captions_a_folder_with_blip2(tmp_path, tiny_blip2) -> None:
    scenes = make_folder(tmp_path / "images", n=12, seed=7)
    expected = expected_predictions(tiny_blip2, sorted(scenes), tmp_path)
    out = tmp_path / "captions.jsonl"
    env = cli_env(tmp_path, MODEL_CONFIG=str(BLIP2_YAML))
    proc = run_cli([str(tmp_path / "images"), "--out", str(out)], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {row["path"]: row["predictions"] for row in read_lines(out)} == expected
    assert "12 captioned" in proc.stderr


def test_ray_captions_with_blip2_from_a_relative_model_config(tmp_path, tiny_blip2) -> None:
    """The README's relative MODEL_CONFIG, resolved in the driver: every actor loads it."""
    require_ray_group()
    from bulk.cli_output import read_parquet_rows

    scenes = make_folder(tmp_path / "images", n=16, seed=8)
    expected = expected_predictions(tiny_blip2, sorted(scenes), tmp_path)
    (tmp_path / "tb2").symlink_to(BLIP2_YAML.parent, target_is_directory=True)
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    try:
        env = cli_env(tmp_path, TMPDIR=str(ray_tmp), MODEL_CONFIG="tb2/model.yaml")
        out = tmp_path / "captions.parquet"
        args = ["images", "--ray", "--actors", "1", "--batch-size", "8", "--out", str(out)]
        proc = run_cli(args, tmp_path, env, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_parquet_rows(out)
    assert {str(Path(row["path"]).resolve()): row["predictions"] for row in rows} == expected


@pytest.mark.parametrize(
    "params",
    [
        {"max_length": "75", "min_length": "75"},
        {"max_length": "1"},
        {"num_beams": "10", "num_captions": "5", "max_length": "40"},
        {"sampling": "true", "num_captions": "5", "top_p": "0.001", "repetition_penalty": "10"},
        {"sampling": "true", "top_p": "1", "num_beams": "1"},
        {"prompt": "a photo of " * 18, "max_length": "75"},
        {"prompt": "un chat 🐈 sur le toit, très «joli» \u202e\u0000", "num_beams": "1"},
        {"prompt": "a", "min_length": "60", "max_length": "20"},
    ],
)
def test_every_option_at_its_limits_is_a_caption_or_a_400(
    serve_app, blip2_settings, tiny_blip2, params
) -> None:
    """The option table's edges on BLIP-2 over HTTP: either captions (as many as asked, none
    empty) or a 400 naming the option, never a 500 or a crash."""
    server = serve_app(blip2_settings.with_overrides(cache_size=0), captioner=tiny_blip2)
    resp = requests.post(
        server.url + "/v3/analyze",
        files={"file": ("x.png", images(1, seed=5)[0], "image/png")},
        params=params,
        timeout=TIMEOUT,
    )
    body = resp.json()
    assert resp.status_code in (200, 400), body
    if resp.status_code == 400:
        message = body["error"]["message"]
        assert any(name in message for name in params), message
        return
    texts = [p["text"] for p in body["predictions"]]
    assert len(texts) == int(params.get("num_captions", 1)) and all(texts), texts
