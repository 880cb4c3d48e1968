"""The folder CLI (`python caption.py`): real subprocesses, the tiny model, real files and URLs.

The expected captions are the tiny model's own (Captioner directly, one batch), not the scene
text: the model is ~97% right, and the CLI must give exactly what the model gives.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import tiny_shapes

ROOT = Path(__file__).resolve().parent.parent
CAPTION_PY = ROOT / "caption.py"
TINY_YAML = ROOT / "models" / "tiny-shapes" / "model.yaml"
N_IMAGES = 200


# --------------------------------------------------------------------------- helpers


def make_folder(folder: Path, n: int = N_IMAGES, seed: int = 91) -> dict[str, str]:
    """`n` tiny-shapes PNGs in `folder`; returns absolute path → scene caption."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    scenes = {}
    for i in range(n):
        scene = tiny_shapes.random_scene(rng)
        path = folder / f"shape{i:03d}.png"
        tiny_shapes.draw(scene, rng).save(path)
        scenes[str(path.resolve())] = scene.caption
    return scenes


def cli_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment a user would set for the tiny model, offline (no emoji download)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        MODEL_CONFIG=str(TINY_YAML),
        DEVICE="cpu",
        AUTO_UPDATE="false",
        EMOJI_CACHE_DIR=str(tmp / "emoji-cache"),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def emoji_store(tmp: Path):
    from emoji_config import EmojiConfigStore
    from settings import Settings

    store = EmojiConfigStore(
        Settings().with_overrides(auto_update=False, emoji_cache_dir=tmp / "emoji-cache")
    )
    store.load()
    return store


def expected_predictions(
    captioner, paths: list[str], tmp: Path, options=None, tags: bool = False
) -> dict[str, list[dict[str, Any]]]:
    """path → the predictions the API would give for it: the model's captions, mapped."""
    from captioning.predictions import predictions
    from image_input.decode import decode_image

    store = emoji_store(tmp)
    out: dict[str, list[dict[str, Any]]] = {}
    for start in range(0, len(paths), 32):
        chunk = paths[start : start + 32]
        images = [decode_image(Path(p).read_bytes(), max_pixels=40_000_000) for p in chunk]
        for path, caps in zip(chunk, captioner.caption(images, options), strict=True):
            out[path] = predictions(caps, store.mapper, tags=tags)
    return out


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run_cli(args: list[str], tmp: Path, env: dict[str, str], timeout: float = 240):
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(CAPTION_PY), *args],
        cwd=tmp,  # no developer .env is read
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    proc.seconds = time.monotonic() - started  # type: ignore[attr-defined]
    return proc


_SHAPES: dict[str, Any] = {}


def shared_shapes(tmp_path_factory, captioner) -> tuple[Path, dict[str, str], dict[str, Any]]:
    """200 generated images, their scenes and the predictions the model gives each of them;
    made once per test session (test_ray.py uses them too). Treat them as read-only."""
    if not _SHAPES:
        tmp = tmp_path_factory.mktemp("shapes")
        scenes = make_folder(tmp / "images")
        expected = expected_predictions(captioner, sorted(scenes), tmp)
        _SHAPES.update(folder=tmp / "images", scenes=scenes, expected=expected)
    return _SHAPES["folder"], _SHAPES["scenes"], _SHAPES["expected"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, tiny_captioner):
    return shared_shapes(tmp_path_factory, tiny_captioner)


# --------------------------------------------------------------------------- end to end


def test_folder_resumes_without_duplicates_and_reports_bad_files(
    shapes, tmp_path, http_server, capsys
):
    from bulk.cli import main

    folder, scenes, expected = shapes
    out = tmp_path / "captions.jsonl"
    env = cli_env(tmp_path)

    # Run 1 (in this process, the model is loaded already) stops after 120 images (--limit),
    # as an interrupted run would.
    started = time.monotonic()
    assert main([str(folder), "--out", str(out), "--limit", "120", "--batch-size", "16"], env) == 0
    first_seconds = time.monotonic() - started
    first_err = capsys.readouterr().err
    rows = read_lines(out)
    assert len(rows) == 120
    assert "img/s" in first_err and "120/200" in first_err  # the tqdm bar, on stderr
    assert "120 captioned" in first_err and "80 not run" in first_err

    # A crash mid-write leaves a torn last line; the rerun must cut it and redo that image.
    text = out.read_bytes()
    last_start = text.rstrip(b"\n").rfind(b"\n") + 1
    out.write_bytes(text[: last_start + 40])
    torn_path = rows[-1]["path"]

    # Run 2, as a user types it (python caption.py): the same folder, bad files, and a URL
    # list (2 good URLs, 1 missing).
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "text.png").write_bytes(b"this is not an image")
    (bad / "empty.jpg").write_bytes(b"")
    good_urls = sorted(scenes)[:2]
    for i, path in enumerate(good_urls):
        http_server.set(
            f"/img{i}.png", Path(path).read_bytes(), headers={"Content-Type": "image/png"}
        )
    urls = [
        http_server.url("/img0.png"),
        http_server.url("/img1.png"),
        http_server.url("/gone.png"),
    ]
    (tmp_path / "urls.txt").write_text("# images on a web server\n" + "\n".join(urls) + "\n\n")
    second = run_cli([str(folder), str(bad), "@urls.txt", "--out", str(out)], tmp_path, env)

    assert second.returncode == 1, second.stderr  # some failed
    rows = read_lines(out)  # every line whole again
    by_path = [r["path"] for r in rows if "path" in r]
    by_url = [r["url"] for r in rows if "url" in r]
    assert len(by_path) == len(set(by_path)) == N_IMAGES  # each image exactly once
    assert sorted(by_url) == urls[:2]
    assert {r["path"]: r["predictions"] for r in rows if "path" in r} == expected
    for row in rows:
        assert set(row) in ({"path", "sha256", "predictions"}, {"url", "sha256", "predictions"})
    assert torn_path in by_path
    url_rows = {r["url"]: r for r in rows if "url" in r}
    for i, path in enumerate(good_urls):
        assert url_rows[urls[i]]["predictions"] == expected[path]
    # The summary: what was resumed, what failed and why.
    assert "83 captioned, 119 already done, 3 failed" in second.stderr
    assert f"{bad / 'text.png'}: Failed to load image" in second.stderr
    assert f"{bad / 'empty.jpg'}" in second.stderr
    assert f"{urls[2]}: Failed to download image" in second.stderr
    # The model is mostly right about the scenes (a sanity check of the images, not the CLI).
    right = sum(expected[p][0]["text"] == s.capitalize() for p, s in scenes.items())
    assert right >= 0.9 * N_IMAGES
    assert "img/s" in second.stderr and "205/205" in second.stderr
    print(f"cli run 1 (in process): {first_seconds:.1f} s, run 2: {second.seconds:.1f} s")


# --------------------------------------------------------------------------- in process


def test_generation_flags_and_tags_reach_the_model(shapes, tmp_path, tiny_captioner, capsys):
    from bulk.cli import main
    from captioning.options import GenerationOptions

    folder, scenes, _ = shapes
    paths = sorted(scenes)[:6]
    out = tmp_path / "two.jsonl"
    args = [*paths, "--out", str(out), "--num-captions", "2", "--num-beams", "4", "--tags", "-q"]
    assert main(args, cli_env(tmp_path)) == 0
    options = GenerationOptions(num_beams=4, num_captions=2)
    expected = expected_predictions(tiny_captioner, paths, tmp_path, options, tags=True)
    rows = read_lines(out)
    assert {r["path"]: r["predictions"] for r in rows} == expected
    assert all(len(r["predictions"]) == 2 and "tags" in r["predictions"][0] for r in rows)
    assert "6 captioned" in capsys.readouterr().err


def test_options_the_model_cannot_serve_stop_the_run_once(shapes, tmp_path, capsys):
    """A prompt that leaves no room within max_length: one clear error (exit 2), not one
    error per image."""
    from bulk.cli import main

    _, scenes, _ = shapes
    out = tmp_path / "o.jsonl"
    args = [*sorted(scenes)[:3], "--out", str(out), "--max-length", "5", "--prompt", "three red"]
    assert main([*args, "-q"], cli_env(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "max_length must be more than" in err and err.count("max_length") == 1
    assert out.read_text() == ""


def test_every_option_in_the_table_is_a_flag_with_its_range(capsys):
    from bulk.cli import build_parser, main
    from captioning.errors import InvalidOption
    from captioning.options import BY_NAME, OPTIONS, TAGS, GenerationOptions

    help_text = build_parser().format_help()
    for spec in (*OPTIONS, TAGS):
        assert "--" + spec.name.replace("_", "-") in help_text
    # Out of range: exit 2 with the option table's own message.
    for flag, value, name in (("--num-beams", "11", "num_beams"), ("--top-p", "0", "top_p")):
        with pytest.raises(SystemExit) as exc:
            main(["x.png", flag, value], {})
        assert exc.value.code == 2
        assert BY_NAME[name].message() in capsys.readouterr().err
    # Options that do not fit together: the same check as the API's.
    with pytest.raises(InvalidOption) as expected:
        GenerationOptions(num_beams=2, num_captions=3).validate()
    with pytest.raises(SystemExit):
        main(["x.png", "--num-beams", "2", "--num-captions", "3"], {})
    assert expected.value.message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([], {})
    assert "give at least one INPUT" in capsys.readouterr().err


def test_unloadable_model_exits_1_with_the_reason(tmp_path, capsys):
    from bulk.cli import main

    image = tmp_path / "a.png"
    tiny_shapes.draw(tiny_shapes.Scene(1, "red", "circle", "gray"), random.Random(1)).save(image)
    env = cli_env(tmp_path, MODEL_CONFIG=str(tmp_path / "missing.yaml"))
    assert main([str(image), "--out", str(tmp_path / "o.jsonl"), "-q"], env) == 1
    assert "model could not be loaded" in capsys.readouterr().err
    assert (tmp_path / "o.jsonl").read_text() == ""


def test_settings_come_from_the_environment_and_flags_override_them():
    from bulk.cli import SETTINGS_FLAGS, build_parser
    from settings import Settings

    env = {"MAX_BATCH_SIZE": "4", "REQUEST_TIMEOUT": "7", "MODEL_CONFIG": "a.yaml"}
    args = build_parser().parse_args(["x", "--batch-size", "12", "--model-config", "b.yaml"])
    settings = Settings.from_env(env, dotenv_path=None).with_flags(args, **SETTINGS_FLAGS)
    assert settings.max_batch_size == 12
    assert settings.model_config == Path("b.yaml")
    assert settings.request_timeout == 7.0


# --------------------------------------------------------------------------- pieces


def test_inputs_folders_patterns_lists_urls(tmp_path):
    from bulk.cli_inputs import Input, expand

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "sub").mkdir()
    for name in ("a/1.png", "a/2.JPG", "a/notes.txt", "a/sub/3.webp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "list.txt").write_text("# comment\n\na/notes.txt\nhttps://h.test/x.jpg\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        flat = expand(["a"])
        deep = expand(["a", "a/*.png", "@list.txt", "http://h.test/y", "nothing*.png"],
                      recursive=True)  # fmt: skip
    finally:
        os.chdir(cwd)
    a = tmp_path / "a"
    assert [i.name for i in flat.inputs] == [str(a / "1.png"), str(a / "2.JPG")]
    assert deep.inputs == [
        Input("file", str(a / "1.png")),
        Input("file", str(a / "2.JPG")),
        Input("file", str(a / "sub" / "3.webp")),
        Input("file", str(a / "notes.txt")),  # named in a list: tried, whatever its suffix
        Input("url", "https://h.test/x.jpg"),
        Input("url", "http://h.test/y"),
    ]
    assert deep.unmatched == ["nothing*.png"]


def test_jsonl_sink_cuts_a_torn_line_and_ignores_damage(tmp_path):
    from bulk.cli_output import JsonlSink

    out = tmp_path / "o.jsonl"
    good = {"path": "/a.png", "sha256": "aa", "predictions": []}
    url = {"url": "http://h/b", "sha256": "bb", "predictions": []}
    out.write_text(json.dumps(good) + "\nnot json\n" + json.dumps(url) + '\n{"path": "/c.pn')
    sink = JsonlSink(out)
    assert sink.done == {"/a.png": "aa", "http://h/b": "bb"}
    assert sink.damaged == 1
    sink.write({"path": "/c.png", "sha256": "cc", "predictions": []})
    sink.close()
    lines = out.read_text().splitlines()
    assert lines[-1] == '{"path": "/c.png", "sha256": "cc", "predictions": []}'
    assert len(lines) == 4
