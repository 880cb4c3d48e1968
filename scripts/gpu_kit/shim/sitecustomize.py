"""GPU kit shim: lets the project's pinned pure-Python stack run on a host's own torch stack.

Python imports `sitecustomize` at start-up; run.sh puts this folder first on PYTHONPATH, so every
Python process of a kit run (pytest, REST.py servers, benchmarks) gets the same adjustments:

- `tokenizers` is hidden (sys.modules entry None): transformers 4.25.1 refuses to import beside
  tokenizers >= 0.14 (its import-time version check), and the captioning path only uses the slow
  Python `BertTokenizer`. Its `is_tokenizers_available()` then answers False, so nothing asks for
  the Rust tokenizers. The kit's caption check shows the token ids are unchanged.
- `transformers.tokenization_utils_fast` becomes a placeholder: 4.25.1's `tokenization_auto`
  imports `PreTrainedTokenizerFast` unconditionally (tokenizers was a hard dependency then), and
  LAVIS imports `AutoTokenizer` at `import lavis`. The placeholder class can be named and compared
  with issubclass, not instantiated; with tokenizers hidden no fast tokenizer exists anyway.
- the kit's `fallback/` folder goes last on sys.path: packages the host's own stack already has
  (jinja2, packaging, tqdm, ...) are taken from the host, ours only where the host has none.
- a missing transformers module (the kit prunes transformers to the models LAVIS imports) raises
  an ImportError that says so, instead of a bare "No module named".
- with GPU_KIT_IMPORTS_DIR set, each process writes at exit which top-level modules it imported
  and from where (kit_versions.py turns these into the versions table).
- the host's own sitecustomize, if any, still runs (this one shadows it on sys.path).
Set GPU_KIT_SHIM=0 to turn all of it off.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import types
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
_KIT = os.path.dirname(_HERE)


FAST_TOKENIZERS = "transformers.tokenization_utils_fast"


class FastTokenizersPlaceholder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """First on sys.meta_path: answers for transformers.tokenization_utils_fast only."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> Any:
        if fullname != FAST_TOKENIZERS:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> None:
        return None  # the default module object

    def exec_module(self, module: types.ModuleType) -> None:
        def refuse(self: object, *args: object, **kwargs: object) -> None:
            raise ModuleNotFoundError(
                "fast tokenizers need the Rust `tokenizers` package, which the GPU kit hides "
                "(transformers 4.25.1 refuses tokenizers >= 0.14); use the slow tokenizer"
            )

        module.PreTrainedTokenizerFast = type(  # type: ignore[attr-defined]
            "PreTrainedTokenizerFast",
            (),
            {"__init__": refuse, "__module__": FAST_TOKENIZERS, "__doc__": "GPU-kit placeholder"},
        )
        module.IS_GPU_KIT_PLACEHOLDER = True  # type: ignore[attr-defined]


class PrunedTransformers(importlib.abc.MetaPathFinder):
    """Last on sys.meta_path: reached only when no finder found a transformers submodule."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname.startswith("transformers.") and fullname in _pruned():
            raise ModuleNotFoundError(
                f"{fullname} was left out of the GPU kit (transformers is pruned to the models "
                "LAVIS imports: scripts/gpu_kit/kit_build.py KEEP_MODELS)",
                name=fullname,
            )
        return None


_PRUNED: set[str] | None = None


def _pruned() -> set[str]:
    global _PRUNED
    if _PRUNED is None:
        try:
            with open(os.path.join(_HERE, "pruned.txt"), encoding="utf-8") as fh:
                _PRUNED = {line.strip() for line in fh if line.strip()}
        except OSError:
            _PRUNED = set()
    return _PRUNED


def _record_imports() -> None:
    """At exit: this process's imported top-level modules (kit_imports does the work)."""
    try:
        import gpu_kit_imports

        gpu_kit_imports.write(os.environ["GPU_KIT_IMPORTS_DIR"], _KIT)
    except Exception as exc:  # never turn a clean exit into a failure
        print(f"gpu-kit: could not record imports: {exc!r}", file=sys.stderr)


def _chain_host_sitecustomize() -> None:
    """Run the next sitecustomize on sys.path (the host's), which this module shadows."""
    for entry in sys.path:
        if not entry or os.path.abspath(entry) == _HERE:
            continue
        candidate = os.path.join(entry, "sitecustomize.py")
        if os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_host_sitecustomize", candidate)
            if spec is None or spec.loader is None:
                return
            try:
                spec.loader.exec_module(importlib.util.module_from_spec(spec))
            except Exception as exc:
                print(f"gpu-kit: host sitecustomize {candidate} failed: {exc!r}", file=sys.stderr)
            return


def _install() -> None:
    sys.modules["tokenizers"] = None  # type: ignore[assignment]
    sys.meta_path.insert(0, FastTokenizersPlaceholder())
    for name, value in (("USE_TF", "0"), ("USE_FLAX", "0"), ("USE_TORCH", "1")):
        os.environ.setdefault(name, value)
    fallback = os.path.join(_KIT, "fallback")
    if os.path.isdir(fallback) and fallback not in sys.path:
        sys.path.append(fallback)
    sys.meta_path.append(PrunedTransformers())
    if os.environ.get("GPU_KIT_IMPORTS_DIR"):
        import atexit

        atexit.register(_record_imports)
    _chain_host_sitecustomize()


if os.environ.get("GPU_KIT_SHIM", "1") != "0":
    _install()
