"""Shared by the OpenAPI tests (tests/test_openapi*.py): fetching the document, the `doc` fixture
(imported by name where a module uses it; it asks for the `server` fixture of rest_helpers), and
checking a real response against what the document says for its route and status."""

from __future__ import annotations

from typing import Any

import pytest
import requests
from jsonschema import Draft202012Validator

JSON = "application/json"
CIRCLES = "Two red circles on a gray background"


def fetch_document(base: str) -> dict[str, Any]:
    resp = requests.get(base + "/openapi.json", timeout=10)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith(JSON)
    return resp.json()


@pytest.fixture
def doc(server) -> dict[str, Any]:
    return fetch_document(server.url)


def schema_validator(doc: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    """A JSON Schema 2020-12 validator whose `#/components/...` refs resolve in `doc`."""
    return Draft202012Validator({**schema, "components": doc["components"]})


def assert_matches(doc: dict[str, Any], path: str, method: str, resp: requests.Response) -> None:
    """The response's status, media type, headers and body are what the document says."""
    operation = doc["paths"][path][method.lower()]
    label = f"{method} {path} → {resp.status_code}: {resp.text[:300]}"
    assert str(resp.status_code) in operation["responses"], f"undocumented status: {label}"
    documented = operation["responses"][str(resp.status_code)]
    media_type = resp.headers["Content-Type"].split(";")[0].strip()
    assert media_type in documented["content"], f"undocumented media type {media_type}: {label}"
    for name, header in documented.get("headers", {}).items():
        assert name in resp.headers or not header.get("required"), f"{name} missing: {label}"
    if "Retry-After" in resp.headers:
        assert "Retry-After" in documented.get("headers", {}), f"undocumented header: {label}"
    if media_type == JSON:
        schema = documented["content"][JSON]["schema"]
        errors = [e.message for e in schema_validator(doc, schema).iter_errors(resp.json())]
        assert not errors, f"{label}\n" + "\n".join(errors)
