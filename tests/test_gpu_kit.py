"""The GPU kit's parts that can break quietly: pins, purity, pruning, the shim, the stubs, the
comparisons (scripts/gpu_kit/, docs/gpu.md). Building the whole kit downloads wheels and takes a
minute, so `make gpu-kit` is its own check; these run the pieces on small trees and in
subprocesses of this environment (the shim and stubs must never enter the test process itself).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KIT_SRC = ROOT / "scripts" / "gpu_kit"
sys.path.insert(0, str(KIT_SRC))

import caption_check  # noqa: E402
import kit_build  # noqa: E402
import kit_env  # noqa: E402
import kit_versions  # noqa: E402


def run_python(code: str, pythonpath: list[Path], env: dict[str, str] | None = None) -> str:
    """Run `code` in a fresh interpreter of this environment with `pythonpath` first."""
    full = {**os.environ, **(env or {})}
    full["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


# --------------------------------------------------------------------------- build steps


def test_every_carried_package_is_pinned_by_the_lock() -> None:
    packages = kit_build.read_packages()
    lock = kit_build.read_lock()
    site = dict(p.split("==") for p in kit_build.pins("site", packages, lock))
    assert site["transformers"] == "4.25.1"
    assert int(site["huggingface-hub"].split(".")[0]) < 1  # 1.0 removed HfFolder
    assert site["timm"] == "0.4.12"
    assert site["salesforce-lavis"] == "1.0.2"
    assert "fairscale" in site
    assert "tokenizers" not in site  # hidden by the shim, never carried
    assert len(site) + len(kit_build.pins("fallback", packages, lock)) == len(packages)


def test_a_package_missing_from_the_lock_stops_the_build(tmp_path: Path) -> None:
    listing = tmp_path / "packages.txt"
    listing.write_text("no-such-package site\n")
    with pytest.raises(SystemExit, match="no-such-package"):
        kit_build.pins("site", kit_build.read_packages(listing), kit_build.read_lock())
    listing.write_text("flask everywhere\n")
    with pytest.raises(SystemExit, match="cannot read"):
        kit_build.read_packages(listing)


def fake_wheel(layer: Path, dist: str, files: dict[str, str], pure: bool) -> None:
    """An unpacked wheel: its files, and a dist-info whose RECORD lists them."""
    info = layer / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    for rel, text in files.items():
        (layer / rel).parent.mkdir(parents=True, exist_ok=True)
        (layer / rel).write_text(text)
    (info / "RECORD").write_text("".join(f"{rel},,\n" for rel in files))
    (info / "WHEEL").write_text(f"Root-Is-Purelib: {'true' if pure else 'false'}\n")


def test_strip_removes_speedups_and_purity_check_catches_the_rest(tmp_path: Path) -> None:
    layer = tmp_path / "site"
    fake_wheel(layer, "speedy", {"speedy/__init__.py": "", "speedy/_c.cpython-312.so": ""}, False)
    fake_wheel(layer, "native_only", {"native_only/_core.abi3.so": ""}, False)
    fake_wheel(layer, "plain", {"plain/__init__.py": ""}, True)
    packages = [
        kit_build.Package("speedy", "site", True),
        kit_build.Package("native-only", "site", False),
        kit_build.Package("plain", "site", False),
    ]
    assert kit_build.strip_binaries(layer, packages) == ["speedy/_c.cpython-312.so"]
    assert (layer / "speedy" / "__init__.py").is_file()
    assert kit_build.binaries(tmp_path) == ["site/native_only/_core.abi3.so"]
    assert kit_build.impure_wheels(layer) == ["native-only", "speedy"]


def test_prune_keeps_what_captioning_imports(tmp_path: Path) -> None:
    site = tmp_path / "site"
    files = [
        "transformers/__init__.py",
        "transformers/convert_graph_to_onnx.py",
        "transformers/models/__init__.py",
        "transformers/models/bert/__init__.py",
        "transformers/models/bert/modeling_bert.py",
        "transformers/models/bert/modeling_tf_bert.py",
        "transformers/models/bert/convert_bert_original_tf_checkpoint_to_pytorch.py",
        "transformers/models/llama/__init__.py",
        "transformers/models/llama/configuration_llama.py",
        "transformers/models/llama/modeling_llama.py",
        "transformers/models/llama/tokenization_llama.py",
        "transformers/models/gpt2/modeling_flax_gpt2.py",
    ]
    for rel in files:
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text("")
    removed = kit_build.prune_transformers(site)
    assert sorted(removed) == sorted(
        [
            "transformers.convert_graph_to_onnx",
            "transformers.models.bert.modeling_tf_bert",
            "transformers.models.bert.convert_bert_original_tf_checkpoint_to_pytorch",
            "transformers.models.llama.modeling_llama",
            "transformers.models.llama.tokenization_llama",
            "transformers.models.gpt2.modeling_flax_gpt2",
        ]
    )
    left = sorted(str(p.relative_to(site)) for p in site.rglob("*.py"))
    assert "transformers/models/llama/configuration_llama.py" in left
    assert "transformers/models/bert/modeling_bert.py" in left
    (site / "transformers/models/bert/modeling_bert.py").unlink()
    with pytest.raises(SystemExit, match="BERT"):
        kit_build.prune_transformers(site, keep=("auto",))


# --------------------------------------------------------------------------- shim and stubs


@pytest.fixture
def fake_kit(tmp_path: Path) -> Path:
    """A kit with the real shim and stubs, a fallback layer and one pruned module."""
    import shutil

    kit = tmp_path / "kit"
    shutil.copytree(KIT_SRC / "shim", kit / "shim")
    shutil.copytree(KIT_SRC / "stubs", kit / "stubs")
    (kit / "fallback").mkdir()
    (kit / "fallback" / "kit_fallback_probe.py").write_text("WHERE = 'fallback'\n")
    (kit / "shim" / "pruned.txt").write_text("transformers.models.bert.modeling_pruned_probe\n")
    return kit


def test_shim_hides_tokenizers_yet_transformers_and_auto_import(fake_kit: Path) -> None:
    out = run_python(
        """
        import importlib, sys
        try:
            import tokenizers
        except ImportError:
            print("tokenizers hidden")
        from transformers.utils import is_tokenizers_available
        from transformers import AutoTokenizer, BertTokenizer
        print("available", is_tokenizers_available())
        fast = importlib.import_module("transformers.tokenization_utils_fast")
        try:
            fast.PreTrainedTokenizerFast()
        except ModuleNotFoundError as exc:
            print("placeholder:", exc)
        try:
            import transformers.models.bert.modeling_pruned_probe
        except ModuleNotFoundError as exc:
            print("pruned:", exc)
        import kit_fallback_probe
        print("fallback last", sys.path[-1].endswith("fallback"), kit_fallback_probe.WHERE)
        """,
        [fake_kit / "shim"],
    )
    assert "tokenizers hidden" in out
    assert "available False" in out
    assert "placeholder: fast tokenizers need the Rust `tokenizers`" in out
    assert (
        "pruned: transformers.models.bert.modeling_pruned_probe was left out of the GPU kit" in out
    )
    assert "fallback last True fallback" in out


def test_shim_off_switch(fake_kit: Path) -> None:
    out = run_python(
        "import sys; print(sys.modules.get('tokenizers', 'absent'))",
        [fake_kit / "shim"],
        {"GPU_KIT_SHIM": "0"},
    )
    assert out.strip() == "absent"


def test_stubs_let_lavis_import_and_refuse_use(fake_kit: Path) -> None:
    out = run_python(
        """
        import decord, spacy
        from decord import VideoReader
        from pycocoevalcap.eval import COCOEvalCap
        from pycocotools.coco import COCO
        decord.bridge.set_bridge("torch")
        print("bridge", decord.bridge.get_bridge())
        for use in (lambda: COCO("x.json"), lambda: COCOEvalCap(), lambda: VideoReader("v"),
                    lambda: spacy.load("en_core_web_sm")):
            try:
                use()
            except ModuleNotFoundError as exc:
                print("refused:", exc)
        """,
        [fake_kit / "stubs"],
    )
    assert "bridge torch" in out
    assert out.count("refused:") == 4
    assert "pycocotools.coco.COCO is a GPU-kit stub" in out
    assert "spacy.load is a GPU-kit stub" in out


def test_each_process_records_its_imports(fake_kit: Path, tmp_path: Path) -> None:
    records = tmp_path / "imports"
    run_python(
        "import yaml, kit_fallback_probe, spacy",
        [fake_kit / "shim", fake_kit / "stubs"],
        {"GPU_KIT_IMPORTS_DIR": str(records)},
    )
    (record,) = [json.loads(p.read_text()) for p in records.glob("imports-*.json")]
    modules = record["modules"]
    assert modules["yaml"]["where"] == "host" and modules["yaml"]["dists"] == {
        "PyYAML": __import__("yaml").__version__
    }
    assert modules["kit_fallback_probe"]["where"] == "kit-fallback"
    assert modules["spacy"]["where"] == "kit-stubs"
    assert "json" not in modules  # the standard library is not a package to report
    rows = kit_versions.merge([record, record])
    by_name = {r["package"]: r for r in rows}
    assert by_name["PyYAML"]["where"] == "host"
    assert by_name["spacy"]["version"] == "stub"
    assert "PyYAML" in kit_versions.render(rows, 2)


# --------------------------------------------------------------------------- comparisons


def test_version_table_names_each_difference() -> None:
    lines, differ = kit_env.table(
        rehearsed={
            "torch": "2.11.0",
            "transformers": "5.17.0",
            "pandas": "3.1.1",
            "tokenizers": "0.23.3",
        },
        host={"torch": "2.12.0", "transformers": "5.17.0", "tokenizers": "0.22.0"},
        carried={"transformers": ("site", "4.25.1"), "jinja2": ("fallback", "3.1.6")},
        layers={"transformers": "site", "jinja2": "fallback"},
    )
    assert differ == [
        "pandas: rehearsed with 3.1.1, this host has none (absent here)",
        "tokenizers: rehearsed with 0.23.3, this host has 0.22.0 (hidden by the shim)",
        "torch: rehearsed with 2.11.0, this host has 2.12.0 (used as found)",
    ]
    text = "\n".join(lines)
    assert "kit 4.25.1" in text  # transformers: ours wins
    assert "kit 3.1.6" in text  # jinja2: the host has none, the fallback is used
    assert "host 2.12.0" in text


def small_record(caption: str, ids: list[int]) -> dict:
    tok = {"class": "BertTokenizer", "size": 9, "special": {"bos": 1}}
    return {
        "images": ["a.png"],
        "captions": {"default": [[caption]]},
        "ids": {"fast": [ids], "stock": [ids]},
        "tokenizer": {**tok, "ids": {"a b": [1, 2]}, "tokens": {"a b": ["a", "b"]}},
        "ids_decode_to_captions": True,
    }


def test_caption_comparison_finds_one_changed_token() -> None:
    ref = small_record("one red circle", [1, 5, 6])
    lines, identical = caption_check.compare(small_record("one red circle", [1, 5, 6]), ref)
    assert identical, lines
    lines, identical = caption_check.compare(small_record("one red circle", [1, 5, 7]), ref)
    assert not identical
    assert "token ids fast     0/1 generated sequences identical" in lines
    changed = small_record("one red circle", [1, 5, 6])
    changed["tokenizer"]["ids"]["a b"] = [1, 3]
    assert not caption_check.compare(changed, ref)[1]


# --------------------------------------------------------------------------- runner


def test_run_sh_is_valid_bash_and_refuses_bad_arguments(tmp_path: Path) -> None:
    script = KIT_SRC / "run.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    done = subprocess.run(
        ["bash", str(script), "--no-such-flag"],
        capture_output=True,
        text=True,
        env={**os.environ, "OUT": str(tmp_path)},
    )
    assert done.returncode == 2 and "unknown argument --no-such-flag" in done.stderr


def test_carry_size_counts_like_tar(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(b"x" * 513)
    (tmp_path / "b").write_bytes(b"")
    # three entries (d, d/a, b) with a header each; 513 bytes take two 512-byte blocks
    assert kit_build.carry_bytes(tmp_path) == 3 * 512 + 1024


def test_the_kit_builds_within_the_carry_limit(tmp_path: Path) -> None:
    """`make gpu-kit`'s script end to end (PyPI for the pinned wheels, the tiny model for the
    reference captions): a kit within 64 MiB as carried, with no compiled file in it."""
    kit = tmp_path / "kit"
    built = subprocess.run(
        ["bash", str(ROOT / "scripts/gpu_kit/build.sh")],
        cwd=ROOT,
        env={**os.environ, "GPU_KIT_DIR": str(kit)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    data = json.loads((kit / "manifest.json").read_text())
    assert data["bytes"]["total"] <= data["carry_bytes"] <= kit_build.LIMIT_BYTES
    assert not kit_build.binaries(kit)
    assert (kit / "run.sh").is_file() and (kit / "shim" / "sitecustomize.py").is_file()
