"""`caption --ray`: Ray Data with an actor pool of Captioners, on an embedded local Ray.

Needs the `ray` dependency group (ray[data], pyarrow); `make test` installs it. The end-to-end
test starts one embedded Ray (2 CPUs, loopback only, small object store) in a subprocess and
shuts it down with the run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from test_cli import TINY_YAML, cli_env, run_cli, shared_shapes

import tiny_shapes


def require_ray_group() -> None:
    """Fail (not skip) with the fix when the ray group is missing or broken."""
    problems = []
    if importlib.util.find_spec("ray") is None:
        problems.append("ray is not installed")
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:  # e.g. pyarrow 26 with numpy 1.x
        problems.append(f"pyarrow does not import: {exc}")
    if problems:
        pytest.fail(
            "the `ray` dependency group is not usable: " + "; ".join(problems) + " (uv sync "
            "--frozen --group ray; pyarrow must be <26 while numpy is pinned <2)",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def ray_group():
    require_ray_group()


@pytest.fixture
def ray_tmp():
    """TMPDIR for the run: short (Ray's socket paths are limited to ~107 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_ray_two_actors_caption_every_image_once(
    tmp_path, tmp_path_factory, ray_tmp, tiny_captioner
):
    """200 images (150 from a folder, 50 from a Parquet column of relative paths) on 2 actors,
    written as Parquet: every image exactly once, the same predictions as the in-process CLI
    (whose reference is the same model called directly, on the same images)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bulk.cli_output import read_parquet_rows

    _, _, by_source = shared_shapes(tmp_path_factory, tiny_captioner)
    paths = sorted(by_source)
    (tmp_path / "folder").mkdir()
    (tmp_path / "listed").mkdir()
    expected = {}
    for i, path in enumerate(paths):
        copy = tmp_path / ("folder" if i < 150 else "listed") / Path(path).name
        shutil.copyfile(path, copy)
        expected[str(copy)] = by_source[path]
    column = [f"listed/{Path(p).name}" for p in paths[150:]] + ["", "listed/missing.png"]
    pq.write_table(pa.table({"path": column}), tmp_path / "inputs.parquet")
    out = tmp_path / "captions.parquet"

    # Relative paths, as the README writes them: the actors' working directory is Ray's own,
    # so the driver must resolve them (MODEL_CONFIG, EMOJI_CACHE_DIR).
    (tmp_path / "tiny").symlink_to(Path(TINY_YAML).parent, target_is_directory=True)
    env = cli_env(tmp_path, TMPDIR=str(ray_tmp), MODEL_CONFIG="tiny/model.yaml")
    env["EMOJI_CACHE_DIR"] = "emoji-cache"
    args = [str(tmp_path / "folder"), "--parquet", "inputs.parquet", "--column", "path"]
    args += ["--ray", "--actors", "2", "--batch-size", "8", "--out", str(out), "-v"]
    proc = run_cli(args, tmp_path, env, timeout=240)

    assert proc.returncode == 1, proc.stderr[-3000:]  # the missing file
    rows = read_parquet_rows(out)
    names = [row["path"] for row in rows]
    assert len(names) == len(set(names)) == 200
    assert {row["path"]: row["predictions"] for row in rows} == expected
    for row in rows:
        assert set(row) == {"path", "sha256", "predictions"}
        assert row["sha256"] == hashlib.sha256(Path(row["path"]).read_bytes()).hexdigest()
    assert "200 captioned, 0 already done, 1 failed" in proc.stderr
    assert f"{tmp_path / 'listed' / 'missing.png'}: File not found" in proc.stderr
    assert "ray: 2 actor processes took part" in proc.stderr
    assert "ActorPlan(actors=2" in proc.stderr
    assert list(ray_tmp.iterdir()) == []  # the embedded Ray's folder is gone
    print(f"ray run: {proc.seconds:.1f} s")


def test_actor_skips_done_images_and_reports_bad_ones(tmp_path, tiny_captioner):
    """The actor class alone (no Ray): what the output already holds is not captioned again,
    a changed file is, a done URL is not downloaded, a bad file is an error row."""
    import pyarrow as pa

    from bulk.ray_pipeline import CaptionActor
    from captioning.options import GenerationOptions
    from settings import Settings

    rng = random.Random(5)
    files = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        tiny_shapes.draw(tiny_shapes.random_scene(rng), rng).save(path)
        files.append(str(path))
    (tmp_path / "bad.png").write_bytes(b"GIF89a broken")
    sha0 = hashlib.sha256(Path(files[0]).read_bytes()).hexdigest()
    done = {files[0]: sha0, files[1]: "0" * 64, "http://127.0.0.1:9/never": "ab" * 32}
    settings = Settings().with_overrides(
        model_config=Path(__file__).parent.parent / "models/tiny-shapes/model.yaml",
        device="cpu",
    )
    actor = CaptionActor(settings, GenerationOptions(), done)
    kinds = ["file", "file", "file", "file", "url"]
    names = [*files, str(tmp_path / "bad.png"), "http://127.0.0.1:9/never"]
    table = actor(pa.table({"kind": kinds, "name": names}))
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["skipped", "captioned", "captioned", "failed", "skipped"]
    assert rows[0]["sha256"] == sha0 and rows[4]["sha256"] == "ab" * 32
    from image_input.decode import decode_image

    images = [decode_image(Path(p).read_bytes(), max_pixels=10**8) for p in files[1:]]
    assert [r["captions"] for r in rows[1:3]] == tiny_captioner.caption(images)
    assert rows[3]["error"].startswith("Failed to load image")


def test_actor_plan():
    from bulk.ray_pipeline import ActorPlan, plan_actors

    assert plan_actors(2, 0, actors=None, num_gpus=None) == ActorPlan(1, 0.0, 2.0)
    assert plan_actors(2, 0, actors=2, num_gpus=None) == ActorPlan(2, 0.0, 1.0)
    assert plan_actors(3, 0, actors=2, num_gpus=None, reserved_cpus=1) == ActorPlan(2, 0.0, 1.0)
    assert plan_actors(16, 4, actors=None, num_gpus=None) == ActorPlan(4, 1.0, 1.0)
    assert plan_actors(16, 4, actors=None, num_gpus=0.5) == ActorPlan(8, 0.5, 1.0)
    assert plan_actors(16, 4, actors=2, num_gpus=1) == ActorPlan(2, 1.0, 1.0)


def test_parquet_sink_resumes_and_replaces_whole(tmp_path):
    from bulk.cli_output import ParquetSink, read_parquet_rows

    out = tmp_path / "o.parquet"
    first = {
        "path": "/a.png",
        "sha256": "aa",
        "predictions": [{"text": "A cat", "emoji_mappings": [{"emoji": "🐱", "word": "cat"}]}],
    }
    second = {"url": "http://h/b", "sha256": "bb", "predictions": [{"text": "B", "tags": ["b"]}]}
    sink = ParquetSink(out)
    sink.write(first)
    sink.close()
    (tmp_path / ".o.parquet.stale.tmp").write_bytes(b"left by a crash")
    sink = ParquetSink(out)
    assert sink.done == {"/a.png": "aa"}
    sink.write(second)
    started = time.monotonic()
    sink.close()
    assert time.monotonic() - started < 5
    assert read_parquet_rows(out) == [first, second]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.parquet"]


def test_parquet_column_inputs(tmp_path):
    """`--parquet FILE --column NAME` without Ray: paths relative to the file, URLs, empty
    cells skipped, a missing column named with the columns there are."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bulk.cli_inputs import Input, InputError, parquet_column, parquet_count

    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "in.parquet"
    cells = ["a.png", None, " ", "/abs/b.jpg", "https://h.test/c.png"]
    pq.write_table(pa.table({"path": cells, "n": [1, 2, 3, 4, 5]}), path, row_group_size=2)
    assert list(parquet_column(path, "path")) == [
        Input("file", str(tmp_path / "sub" / "a.png")),
        Input("file", "/abs/b.jpg"),
        Input("url", "https://h.test/c.png"),
    ]
    assert parquet_count(path, "path") == 3
    with pytest.raises(InputError, match="has no column 'paths' \\(columns: path, n\\)"):
        list(parquet_column(path, "paths"))
    (tmp_path / "not.parquet").write_bytes(b"nope")
    with pytest.raises(InputError, match="cannot read Parquet file"):
        parquet_count(tmp_path / "not.parquet", "path")
