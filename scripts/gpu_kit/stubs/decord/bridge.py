"""GPU-kit stub of decord.bridge: `set_bridge` only chooses the tensor type that VideoReader
would return, so remembering the choice is all it has to do here."""

from __future__ import annotations

_bridge = "native"


def set_bridge(name: str) -> None:
    global _bridge
    _bridge = name


def get_bridge() -> str:
    return _bridge
