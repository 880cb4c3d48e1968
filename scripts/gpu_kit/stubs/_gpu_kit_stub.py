"""Placeholders for packages LAVIS imports at `import lavis` but captioning never uses.

`lavis/__init__.py` imports every dataset builder, model and task, so `import lavis` reaches
spaCy (img2prompt VQA), pycocotools and pycocoevalcap (caption evaluation) and decord (video
datasets). None has a wheel for every host, and none is used to caption an image. The stubs make
the import succeed and make any use fail at once, naming the stub, instead of doing something
wrong quietly.
"""

from __future__ import annotations

from typing import Any, NoReturn

IS_GPU_KIT_STUB = True


def refuse(what: str) -> NoReturn:
    raise ModuleNotFoundError(
        f"{what} is a GPU-kit stub (scripts/gpu_kit/stubs): the kit only carries what image "
        "captioning needs; install the real package to use it"
    )


def placeholder(module: str, name: str) -> type:
    """A class that can be imported and named in annotations, but not instantiated."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        refuse(f"{module}.{name}")

    return type(name, (), {"__init__": __init__, "__module__": module, "__doc__": "GPU-kit stub"})


def function(module: str, name: str) -> Any:
    """A function that refuses when called."""

    def stub(*args: Any, **kwargs: Any) -> NoReturn:
        refuse(f"{module}.{name}")

    stub.__name__ = stub.__qualname__ = name
    stub.__module__ = module
    return stub
