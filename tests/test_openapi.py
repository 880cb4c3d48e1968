"""The OpenAPI 3.1 document (`GET /openapi.json`) and Swagger UI (`GET /docs`), issue 8 items 1-2.

The document must be valid OpenAPI 3.1, cover every route the app really serves, take its option
ranges from `captioning.options.OPTIONS` (the service accepts each documented edge and refuses
just beyond it), and carry examples that match its schemas. Swagger UI is driven in Debian's
headless Chromium through Playwright: "Try it out" with a PNG upload must caption. Real responses
checked against the document are in test_openapi_responses.py.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from openapi_spec_validator import OpenAPIV31SpecValidator

from captioning.options import OPTIONS, TAGS
from chromium_browser import WAIT_MS, chromium_context
from openapi_helpers import CIRCLES, fetch_document, schema_validator
from openapi_helpers import doc as doc  # a fixture, imported for pytest
from rest_helpers import server as server  # a fixture, imported for pytest
from rest_helpers import two_red_circles

IGNORED_METHODS = {"HEAD", "OPTIONS"}  # answered by every route (Flask, CORS); see info


def flask_path(rule: str) -> str:
    """`/v3/jobs/<job_id>` or `/x/<int:n>` → OpenAPI's `/v3/jobs/{job_id}`, `/x/{n}`."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


# ----------------------------------------------------------------------------- the document


def test_document_is_valid_openapi_3_1_and_built_once(server) -> None:
    doc = fetch_document(server.url)
    assert doc["openapi"].startswith("3.1")
    OpenAPIV31SpecValidator(doc).validate()
    from http_api import openapi

    built = server.app.extensions[openapi.EXTENSION]
    assert fetch_document(server.url) == doc
    assert server.app.extensions[openapi.EXTENSION] is built  # cached per app, not rebuilt


def test_every_route_and_method_is_documented(server, doc) -> None:
    """Any URL rule the app serves (static files aside) without a path in the document fails
    here, and so does a documented path the app does not serve."""
    served = set()
    for rule in server.app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.endpoint.endswith(".static"):
            continue
        for method in set(rule.methods or ()) - IGNORED_METHODS:
            served.add((flask_path(rule.rule), method.lower()))
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert served - documented == set(), "routes missing from /openapi.json"
    assert documented - served == set(), "documented routes the app does not serve"
    expected = {
        ("/analyze", "get"),
        ("/analyze", "post"),
        ("/v3/analyze", "get"),
        ("/v3/analyze", "post"),
        ("/health", "get"),
        ("/", "get"),
        ("/openapi.json", "get"),
        ("/docs", "get"),
    }
    assert expected <= documented


def test_routes_added_later_describe_themselves(base_settings, monkeypatch) -> None:
    """A new blueprint module contributes its paths and schemas (function or static form), an
    app-level route through add_part; the same operation defined twice is an error."""
    import types

    from flask import Blueprint

    from captioning.errors import InvalidRequest, Overloaded
    from captioning.runtime import Runtime
    from http_api import health, openapi
    from REST import create_app

    batch = types.ModuleType("blip2_test_batch")
    batch.openapi_part = lambda settings: openapi.ApiPart(  # type: ignore[attr-defined]
        paths={
            "/example/batch": {
                "post": {
                    "operationId": "batch",
                    "responses": {
                        "200": openapi.json_response("done", "BatchResult"),
                        **openapi.error_responses(InvalidRequest, Overloaded),
                    },
                }
            }
        },
        schemas={"BatchResult": {"type": "object"}},
    )
    jobs = types.ModuleType("blip2_test_jobs")
    jobs.OPENAPI_PATHS = {  # type: ignore[attr-defined]
        "/example/jobs/{job_id}": {
            "get": {
                "parameters": [
                    {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {"200": {"description": "a job"}},
            }
        }
    }
    monkeypatch.setitem(sys.modules, batch.__name__, batch)
    monkeypatch.setitem(sys.modules, jobs.__name__, jobs)

    runtime = Runtime(base_settings)
    app = create_app(runtime)
    app.register_blueprint(Blueprint("test_later_batch", batch.__name__))
    app.register_blueprint(Blueprint("test_later_jobs", jobs.__name__))
    openapi.add_part(
        app,
        lambda settings: openapi.ApiPart(
            paths={"/example/text": {"get": {"responses": {"200": {"description": "text"}}}}}
        ),
    )
    try:
        doc = openapi.document(app, base_settings)
        OpenAPIV31SpecValidator(doc).validate()
        added = {"/example/batch", "/example/jobs/{job_id}", "/example/text"}
        assert added | {"/analyze"} <= set(doc["paths"])
        assert "BatchResult" in doc["components"]["schemas"]
        batch_responses = doc["paths"]["/example/batch"]["post"]["responses"]
        assert set(batch_responses) == {"200", "400", "500", "503"}
        assert "Retry-After" in batch_responses["503"]["headers"]  # Overloaded, per HTTP_TABLE
        twice = [health.openapi_part, health.openapi_part]
        assert openapi.build(twice, base_settings)["paths"]["/health"]  # equal: merged
        clash = openapi.ApiPart(paths={"/health": {"get": {"responses": {}}}})
        with pytest.raises(ValueError, match="defined twice"):
            openapi.build([health.openapi_part, lambda s: clash], base_settings)
    finally:
        runtime.stop()


def test_analyze_operations_describe_every_input(doc) -> None:
    options = {spec.name: spec for spec in (*OPTIONS, TAGS)}
    for path in ("/analyze", "/v3/analyze"):
        for method in ("get", "post"):
            operation = doc["paths"][path][method]
            params = {p["name"]: p for p in operation["parameters"]}
            assert list(params) == ["url", "file", *options], (path, method)
            assert all(p["in"] == "query" and not p["required"] for p in params.values())
            for name, spec in options.items():
                schema = params[name]["schema"]
                assert schema["default"] == spec.default, name
                low = "exclusiveMinimum" if spec.exclusive_minimum else "minimum"
                assert schema.get(low) == spec.minimum, name
                assert schema.get("maximum") == spec.maximum, name
                assert schema.get("maxLength") == spec.max_chars, name
                assert spec.help in params[name]["description"], name
            statuses = set(operation["responses"])
            assert statuses == {"200", "400", "403", "413", "500", "503"}, (path, method)
            assert "Retry-After" in operation["responses"]["503"]["headers"]
    body = doc["paths"]["/analyze"]["post"]["requestBody"]
    assert not body["required"]
    assert set(body["content"]) == {
        "multipart/form-data",
        "image/jpeg",
        "image/png",
        "image/webp",
        "application/octet-stream",
    }
    assert body["content"]["multipart/form-data"]["schema"]["required"] == ["file"]
    assert "requestBody" not in doc["paths"]["/analyze"]["get"]


def test_documented_option_ranges_are_what_the_service_accepts(server, doc) -> None:
    """Each option at its documented bounds is accepted and just beyond them refused, naming
    the option. A missing `file=` keeps the model out of it: accepted options fail later, with
    `File not found`."""
    missing = "/nonexistent/blip2-openapi-test.png"
    params = doc["paths"]["/analyze"]["get"]["parameters"]
    options = {p["name"]: p["schema"] for p in params if p["name"] not in ("url", "file")}
    longest = str(options["max_length"]["maximum"])

    def verdict(name: str, value: str) -> str:
        query = {"file": missing, name: value}
        for companion, companion_value in (("sampling", "true"), ("max_length", longest)):
            query.setdefault(companion, companion_value)
        resp = requests.get(server.url + "/analyze", params=query, timeout=10)
        assert resp.status_code == 400, resp.text
        message = resp.json()["error"]["message"]
        if message == f"File not found: {missing}":
            return "accepted"
        assert message.startswith(name), (name, value, message)
        return "refused"

    for name, schema in options.items():
        accepted, refused = bounds(schema)
        for value in accepted:
            assert verdict(name, value) == "accepted", (name, value)
        for value in refused:
            assert verdict(name, value) == "refused", (name, value)


def test_every_documented_option_edge_captions(server, doc) -> None:
    """What the document allows, the service must serve: each option at each documented edge
    (with the companions that make the combination valid) captions a real image with 200. The
    longest documented prompt may be refused with a 400 naming an option (the prompt must leave
    room under max_length), never with a 5xx."""
    image = two_red_circles()
    params = doc["paths"]["/analyze"]["post"]["parameters"]
    options = {p["name"]: p["schema"] for p in params if p["name"] not in ("url", "file")}
    companions = {
        "num_captions": {"num_beams": options["num_beams"]["maximum"]},
        "min_length": {"max_length": options["max_length"]["maximum"]},
        "top_p": {"sampling": "true"},
    }

    def caption(query: dict[str, Any]) -> requests.Response:
        return requests.post(
            server.url + "/analyze",
            params=query,
            data=image,
            headers={"Content-Type": "image/png"},
            timeout=30,
        )

    failures = []
    for name, schema in options.items():
        if schema["type"] not in ("integer", "number"):
            continue
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0) + 1e-9)
        for value in (low, schema["maximum"]):
            query = {name: value, **companions.get(name, {})}
            resp = caption(query)
            if resp.status_code != 200:
                failures.append(f"{query} → {resp.status_code} {resp.text[:120]}")
    words = ("red " * options["prompt"]["maxLength"])[: options["prompt"]["maxLength"]]
    longest = caption({"prompt": words})
    if longest.status_code != 200 and not (
        longest.status_code == 400
        and longest.json()["error"]["message"].startswith(("max_length", "prompt"))
    ):
        failures.append(f"longest prompt → {longest.status_code} {longest.text[:120]}")
    assert not failures, "\n".join(failures)


def bounds(schema: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Query values the schema allows at its edges, and values just outside them."""
    kind = schema["type"]
    if kind == "boolean":
        return ["true", "false"], ["maybe"]
    if kind == "string":
        return ["a" * schema["maxLength"]], ["a" * (schema["maxLength"] + 1)]
    step = 1 if kind == "integer" else 0.001
    accepted, refused = [str(schema["default"]), str(schema["maximum"])], []
    refused.append(str(schema["maximum"] + step))
    if "exclusiveMinimum" in schema:
        accepted.append(str(schema["exclusiveMinimum"] + step))
        refused.append(str(schema["exclusiveMinimum"]))
    else:
        accepted.append(str(schema["minimum"]))
        refused.append(str(schema["minimum"] - step))
    if kind == "integer":
        refused.append("1.5")
    return accepted, refused


def test_every_example_matches_its_schema(doc) -> None:
    for schema in doc["components"]["schemas"].values():
        for example in schema.get("examples", []):
            schema_validator(doc, schema).validate(example)
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                for media in response.get("content", {}).values():
                    for example in media.get("examples", {}).values():
                        errors = list(
                            schema_validator(doc, media["schema"]).iter_errors(example["value"])
                        )
                        assert not errors, (path, method, status, errors[0].message)


# ----------------------------------------------------------------------------- Swagger UI


def test_docs_page_is_self_contained(server) -> None:
    resp = requests.get(server.url + "/docs", timeout=10)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/html")
    html = resp.text
    assert not re.search(r'(src|href)="(/|https?:|//)', html), "absolute URL in /docs"
    assets = re.findall(r'(?:src|href)="(docs/static/[^"]+)"', html)
    assert len(assets) == 5
    for asset in assets:
        got = requests.get(f"{server.url}/{asset}", timeout=10)
        assert got.status_code == 200 and len(got.content) > 100, asset
    version = requests.get(server.url + "/docs/static/VERSION", timeout=10).text.strip()
    assert re.match(r"v?5\.", version), version  # Swagger UI 5 renders OpenAPI 3.1
    policy = resp.headers["Content-Security-Policy"]
    assert "script-src 'self' 'sha256-" in policy and "unsafe-eval" not in policy
    assert '"validatorUrl": null' in html  # no request to validator.swagger.io


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with chromium_context(tmp_path_factory.mktemp("chromium-profile"), 1280, 1000) as context:
        yield context


def test_swagger_ui_try_it_out_captions_an_upload(chromium, server, tmp_path: Path) -> None:
    image = tmp_path / "two-red-circles.png"
    image.write_bytes(two_red_circles())
    page = chromium.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"uncaught: {exc}"))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    origins: set[str] = set()
    page.on("request", lambda req: origins.add(re.sub(r"^(\w+://[^/]+).*", r"\1", req.url)))

    page.goto(server.url + "/docs", timeout=WAIT_MS)
    operation = page.locator("#operations-analyze-post_v3_analyze")
    operation.locator(".opblock-summary").click()
    operation.locator(".try-out__btn").click()
    operation.locator("select#post_v3_analyze_requests_select").select_option("multipart/form-data")
    operation.locator("input[type=file]").set_input_files(str(image))
    operation.locator("button.execute").click()
    answer = operation.locator(".live-responses-table tbody tr.response").first
    answer.wait_for(timeout=WAIT_MS)

    assert answer.locator(".response-col_status").inner_text().strip() == "200"
    body = answer.locator(".response-col_description pre").first.inner_text()
    assert f'"text": "{CIRCLES}"' in body, body
    assert '"status": "success"' in body
    assert problems == []
    assert origins == {server.url}, origins  # nothing from a CDN or any other host
