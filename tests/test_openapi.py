"""The OpenAPI document: generated from the route table, served at /openapi.json and stored in
docs/openapi.json."""

from __future__ import annotations

import json

import schemathesis

from chalicelib import openapi
from tests.conftest import PROJECT_DIR

DOCUMENT_PATH = PROJECT_DIR / "docs" / "openapi.json"
# POST routes that take no request body.
BODYLESS_POSTS = {"/ws/token", "/dashboard/ws-token"}


def app_document():
    from app import app

    return app, openapi.build_document(app)


def test_stored_document_matches_code():
    _, document = app_document()
    stored = DOCUMENT_PATH.read_text()
    assert stored == openapi.render(document), (
        "docs/openapi.json is out of date; run: .venv/bin/python -m chalicelib.openapi "
        "docs/openapi.json"
    )


def test_document_covers_every_route():
    app, document = app_document()
    routes = {(path, method.lower()) for path, methods in app.routes.items() for method in methods}
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    assert documented == routes


def test_every_post_route_describes_its_body():
    app, document = app_document()
    for path, methods in app.routes.items():
        if "POST" not in methods or path in BODYLESS_POSTS:
            continue
        operation = document["paths"][path]["post"]
        assert "requestBody" in operation, f"POST {path} has no body model in the document"


def test_body_schema_lists_model_fields():
    _, document = app_document()
    schema = document["components"]["schemas"]["ScaleRequest"]
    assert set(schema["properties"]) == {
        "count",
        "provider",
        "gpu_type",
        "tp_size",
        "pp_size",
        "on_demand",
        "force",
    }
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["count"]


def test_query_parameters_come_from_view_source():
    _, document = app_document()
    parameters = document["paths"]["/jobs"]["get"]["parameters"]
    limit = next(p for p in parameters if p["name"] == "limit")
    assert limit["schema"] == {"type": "integer", "default": 50, "minimum": 1, "maximum": 200}
    assert {p["name"] for p in parameters} == {"limit", "next_token"}


def test_security_matches_route_kind():
    _, document = app_document()
    paths = document["paths"]
    assert paths["/job/{job_id}/chunks/pull"]["post"]["security"] == [{"replicaToken": []}]
    assert paths["/submit/batch"]["post"]["security"] == [{"sigv4": []}]
    assert paths["/openapi.json"]["get"]["security"] == []


def test_document_loads_in_schemathesis():
    _, document = app_document()
    schema = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == sum(len(item) for item in document["paths"].values())


def test_openapi_route_needs_no_credentials(client):
    response = client.http.get("/openapi.json")
    assert response.status_code == 200
    assert response.json_body == json.loads(DOCUMENT_PATH.read_text())
