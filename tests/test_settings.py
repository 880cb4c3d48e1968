"""Settings are read once, typed and validated, with clear errors naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from settings import Settings, SettingsError


def test_defaults_match_the_reference() -> None:
    s = Settings.from_mapping({})
    assert (s.port, s.private, s.bind_host) == (7777, False, "0.0.0.0")
    assert (s.model_name, s.model_type, s.precision) == ("blip_caption", "large_coco", "fp32")
    assert s.max_file_size == 32 * 1024 * 1024 and s.max_image_pixels == 40_000_000
    assert (s.auto_update, s.timeout, s.file_roots) == (True, 10.0, None)
    assert (s.max_batch_size, s.batch_wait_ms, s.request_timeout) == (8, 10, 60.0)


def test_parsing_and_precedence(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("PORT=8000\nPRIVATE=true\nTIMEOUT=3\n")
    s = Settings.from_env({"PORT": "9000", "FILE_ROOTS": f"{tmp_path}:{tmp_path / 'b'}"}, env_file)
    assert s.port == 9000  # the environment wins over .env
    assert s.private and s.bind_host == "127.0.0.1"
    assert s.timeout == 3.0
    assert s.file_roots == (tmp_path.resolve(), (tmp_path / "b").resolve())
    assert Settings.from_mapping({"API_TIMEOUT": "4"}).timeout == 4.0
    assert Settings.from_mapping({"API_TIMEOUT": "4", "TIMEOUT": "5"}).timeout == 5.0
    assert Settings.from_mapping({"PORT": ""}).port == 7777  # empty means unset


@pytest.mark.parametrize(
    "env,name",
    [
        ({"PORT": "http"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"PRIVATE": "maybe"}, "PRIVATE"),
        ({"PRECISION": "fp8"}, "PRECISION"),
        ({"TIMEOUT": "-1"}, "TIMEOUT"),
        ({"MAX_BATCH_SIZE": "0"}, "MAX_BATCH_SIZE"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_mapping(env)


def test_overrides_are_checked() -> None:
    assert Settings().with_overrides(port=1).port == 1
    with pytest.raises(SettingsError, match="nope"):
        Settings().with_overrides(nope=1)


def test_env_example_documents_every_variable() -> None:
    import re

    root = Path(__file__).resolve().parent.parent
    source = (root / "settings.py").read_text()
    names = set(re.findall(r'put\("([A-Z_]+)"', source)) - {"API_TIMEOUT"}
    documented = set(re.findall(r"^([A-Z_]+)=", (root / ".env.example").read_text(), re.M))
    assert names == documented
