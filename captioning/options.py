"""Generation options, defined once.

Each option is one :class:`OptionSpec` row in :data:`OPTIONS`: public name, type, range, default
and help. Everything else is derived from that table — the query-string and JSON parsers, the
model's validation, the OpenAPI schema and the CLI flags — so a range cannot say one thing in
the docs and another in the code. Defaults are the reference service's (CONTRACT.md "Model
facts"); absent options mean the reference behaviour.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from captioning.errors import InvalidOption

_TRUE = ("true", "1")
_FALSE = ("false", "0")


@dataclass(frozen=True)
class OptionSpec:
    """One generation option as callers see it (`name`) and as the model gets it (`field`)."""

    name: str
    field: str
    kind: type  # bool, int, float or str
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    max_chars: int | None = None

    def message(self, max_length: int | None = None) -> str:
        """The one error message for this option (min_length's ceiling is max_length)."""
        if self.kind is bool:
            return f"{self.name} must be true or false"
        if self.kind is str:
            return f"{self.name} must be text of at most {self.max_chars} characters"
        if self.name == "min_length" and max_length is not None:
            return f"min_length must be an integer from 0 to max_length ({max_length})"
        if self.kind is int:
            return f"{self.name} must be an integer from {self.minimum:g} to {self.maximum:g}"
        if self.exclusive_minimum:
            return f"{self.name} must be a number in ({self.minimum:g}, {self.maximum:g}]"
        return f"{self.name} must be a number from {self.minimum:g} to {self.maximum:g}"

    def in_range(self, value: Any) -> bool:
        if self.kind is str:
            return self.max_chars is None or len(value) <= self.max_chars
        if self.kind is bool:
            return isinstance(value, bool)
        low_ok = (
            self.minimum is None
            or value > self.minimum
            or (value == self.minimum and not self.exclusive_minimum)
        )
        return low_ok and (self.maximum is None or value <= self.maximum)

    def parse(self, raw: Any) -> Any:
        """A value from a query string (str) or JSON (typed); InvalidOption when it is not one."""
        value = self._coerce(raw)
        if value is None or not self.in_range(value):
            raise InvalidOption(self.name, self.message())
        return value

    def _coerce(self, raw: Any) -> Any:
        if self.kind is str:
            return raw.strip() if isinstance(raw, str) else None
        if isinstance(raw, str):
            text = raw.strip().lower()
            if self.kind is bool:
                return True if text in _TRUE else False if text in _FALSE else None
            try:
                number = int(text) if self.kind is int else float(text)
            except ValueError:
                return None
            return number if self.kind is int or math.isfinite(number) else None
        if self.kind is bool:
            return raw if isinstance(raw, bool) else None
        if isinstance(raw, bool):
            return None
        if self.kind is int:
            return raw if isinstance(raw, int) else None
        return float(raw) if isinstance(raw, int | float) and math.isfinite(raw) else None


MAX_BEAMS = 10
MAX_LENGTH = 75
MAX_CAPTIONS = 5
MAX_PROMPT_CHARS = 200

OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("num_beams", "num_beams", int, 3, "beam width", 1, MAX_BEAMS),
    # Counts the decoder prompt: the model's "[DEC] a picture of" is 4 tokens, so 5 is the
    # least that leaves room for a word (a longer `prompt` needs more; the model checks).
    OptionSpec(
        "max_length",
        "max_length",
        int,
        30,
        "maximum tokens, prompt included (BLIP-2: new tokens; docs/models.md)",
        5,
        MAX_LENGTH,
    ),
    OptionSpec(
        "min_length",
        "min_length",
        int,
        10,
        "minimum caption tokens, prompt included (<= max_length)",
        0,
        MAX_LENGTH,
    ),
    OptionSpec(
        "sampling", "use_nucleus_sampling", bool, False, "nucleus sampling instead of beams"
    ),
    OptionSpec(
        # Below 0.001 Hugging Face's top-p filter can leave no finite logit (NaN probabilities).
        "top_p",
        "top_p",
        float,
        0.9,
        "nucleus mass when sampling",
        0.001,
        1.0,
    ),
    OptionSpec(
        "num_captions", "num_captions", int, 1, "captions per image (<= num_beams)", 1, MAX_CAPTIONS
    ),
    OptionSpec("repetition_penalty", "repetition_penalty", float, 1.0, "1.0 = none", 1.0, 10.0),
    OptionSpec(
        "prompt",
        "prompt",
        str,
        "",
        "text the caption must continue",
        max_chars=MAX_PROMPT_CHARS,
    ),
)
#: Not a generation option (the model never sees it): shapes the predictions in the answer.
TAGS = OptionSpec(
    "tags", "tags", bool, False, "add predictions[i].tags: content words and known phrases"
)
BY_NAME: dict[str, OptionSpec] = {spec.name: spec for spec in OPTIONS}
BY_FIELD: dict[str, OptionSpec] = {spec.field: spec for spec in OPTIONS}


@dataclass(frozen=True)
class GenerationOptions:
    """How to decode; the field defaults come from :data:`OPTIONS`."""

    num_beams: int = BY_FIELD["num_beams"].default
    max_length: int = BY_FIELD["max_length"].default
    min_length: int = BY_FIELD["min_length"].default
    use_nucleus_sampling: bool = BY_FIELD["use_nucleus_sampling"].default
    top_p: float = BY_FIELD["top_p"].default
    num_captions: int = BY_FIELD["num_captions"].default
    repetition_penalty: float = BY_FIELD["repetition_penalty"].default
    prompt: str = BY_FIELD["prompt"].default

    MAX_BEAMS = MAX_BEAMS
    MAX_LENGTH = MAX_LENGTH
    MAX_CAPTIONS = MAX_CAPTIONS
    MAX_PROMPT_CHARS = MAX_PROMPT_CHARS

    def validate(self) -> GenerationOptions:
        """Raise InvalidOption naming the first bad option and its allowed range."""
        for f in fields(self):
            spec = BY_FIELD[f.name]
            if not spec.in_range(getattr(self, f.name)):
                raise InvalidOption(spec.name, spec.message())
        if self.min_length > self.max_length:
            raise InvalidOption("min_length", BY_NAME["min_length"].message(self.max_length))
        if not self.use_nucleus_sampling and self.num_captions > self.num_beams:
            raise InvalidOption(
                "num_captions",
                f"num_captions must be at most num_beams ({self.num_beams}) without sampling",
            )
        return self

    def signature(self) -> tuple[Any, ...]:
        """Everything that shapes the output: equal signatures share a batch and a cache slot."""
        return (
            self.num_beams,
            self.max_length,
            self.min_length,
            self.use_nucleus_sampling,
            self.top_p if self.use_nucleus_sampling else None,
            self.num_captions,
            self.repetition_penalty,
            self.prompt,
        )

    def as_public(self) -> dict[str, Any]:
        """The options under their public names (JSON job records, CLI output)."""
        return {BY_FIELD[f.name].name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_public(cls, values: Mapping[str, Any]) -> GenerationOptions:
        """Options from a query string or a JSON object; unknown names are ignored, blank
        strings count as absent. A shorter max_length pulls the default minimum down with it."""
        kw: dict[str, Any] = {}
        for spec in OPTIONS:
            raw = values.get(spec.name)
            if raw is None or (isinstance(raw, str) and raw.strip() == "" and spec.kind is not str):
                continue
            value = spec.parse(raw)
            if spec.kind is str and not value:
                continue
            kw[spec.field] = value
        if "max_length" in kw and "min_length" not in kw:
            kw["min_length"] = min(BY_FIELD["min_length"].default, kw["max_length"])
        return cls(**kw).validate()


def tags_requested(values: Mapping[str, Any]) -> bool:
    """The `tags` flag from a query string or JSON object (absent or blank: false)."""
    raw = values.get(TAGS.name)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return False
    return bool(TAGS.parse(raw))
