"""OpenAPI 3.1 document of the REST API, built from the Chalice route table and the pydantic models.

Every route in ``app.routes`` becomes an operation, so a new route appears without an edit here.
The generator reads the source of each view function, and of the private helpers in app.py that
it calls, to find what the route takes:

- the request body model: the first argument of a call to ``_body(Model)`` or
  ``parse_body(Model, ...)``;
- query parameters: calls of ``query_int(params, "name", default, low, high)``,
  ``query_float(params, "name", low, high)`` and ``params.get("name")``;
- the replica bearer token: a call of ``_replica(...)``;
- the dashboard token: a call of one of ``DASHBOARD_TOKEN_CALLS``;
- the response's content type: a literal ``"Content-Type"`` in a ``headers={...}`` argument.

User routes carry Chalice's ``IAMAuthorizer`` (AWS SigV4 in a deployed stage). ``docs/openapi.json``
is this document, written by ``make openapi`` (``python -m chalicelib.openapi docs/openapi.json``);
``tests/test_openapi.py`` fails when the two differ.
"""

from __future__ import annotations

import ast
import inspect
import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from chalicelib import models
from chalicelib.http import MAX_BODY_BYTES

OPENAPI_VERSION = "3.1.0"
API_TITLE = "Tandemn control plane"
API_VERSION = "0.1.0"
COMPONENT_REF = "#/components/schemas/{model}"
# Helpers in app.py whose call checks the dashboard token (chalicelib/dashboard.py).
DASHBOARD_TOKEN_CALLS = frozenset({"_dashboard_settings", "_dashboard_payload"})

# Response bodies described by a model; every other JSON response is documented as an object.
RESPONSE_MODELS: dict[str, type[BaseModel]] = {
    "submit_batch": models.SubmitBatchResponse,
}
# Content types of success responses whose view sets none in a literal "Content-Type" header.
RESPONSE_CONTENT_TYPES: dict[str, str] = {
    "dashboard_page": "text/html",
}

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "An error: a machine-readable code and a message that names the field, the "
    "value and the fix.",
    "required": ["code", "message"],
    "properties": {
        "code": {"type": "string", "examples": ["invalid_request", "not_found", "lease_lost"]},
        "message": {"type": "string"},
        "field": {"type": "string", "description": "the field or parameter that was rejected"},
        "errors": {
            "type": "array",
            "description": "one entry per invalid field or input line",
            "items": {"type": "object"},
        },
    },
}

SECURITY_SCHEMES: dict[str, Any] = {
    "sigv4": {
        "type": "apiKey",
        "name": "Authorization",
        "in": "header",
        "description": "AWS Signature Version 4 with the caller's IAM credentials, checked by "
        "API Gateway's IAM authorizer in a deployed stage. The local stage listens on "
        "127.0.0.1 and does not check it.",
        "x-amazon-apigateway-authtype": "awsSigv4",
    },
    "replicaToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "The replica token trk_<replica_id>.<secret>, valid only for its own job "
        "and replica id.",
    },
    "dashboardToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "A dashboard token tdb_<claims>.<signature> from POST /dashboard/token, "
        "also accepted as the query parameter token. The local stage does not require it.",
    },
}


class RouteFacts:
    """Facts read from a view function's source: body model, query parameters and credentials."""

    def __init__(self) -> None:
        self.body_model: type[BaseModel] | None = None
        self.query: dict[str, dict[str, Any]] = {}
        self.replica_token = False
        self.dashboard_token = False
        self.content_type: str | None = None


def _constant(node: ast.expr, namespace: dict[str, Any]) -> Any:
    """Evaluate a literal, a name or an attribute chain such as ``jobs.MAX_LIST_LIMIT``."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if isinstance(node, ast.Name):
        return namespace.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = _constant(node.value, namespace)
        return getattr(owner, node.attr, None)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Add)):
        left, right = _constant(node.left, namespace), _constant(node.right, namespace)
        if isinstance(left, (int, float)) and isinstance(right, (int, float)):
            return left * right if isinstance(node.op, ast.Mult) else left + right
    return None


def _call_name(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def _query_parameter(call: ast.Call, name: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """Return the JSON schema of a query parameter read by ``query_int`` or ``query_float``."""
    args = [_constant(arg, namespace) for arg in call.args[2:]]
    if name == "query_int":
        schema: dict[str, Any] = {"type": "integer"}
        default, low, high = (args + [None, None, None])[:3]
        if default is not None:
            schema["default"] = default
    else:
        schema = {"type": "number"}
        low, high = (args + [0.0, 1e12])[:2]
    if isinstance(low, (int, float)):
        schema["minimum"] = low
    if isinstance(high, (int, float)):
        schema["maximum"] = high
    return schema


def _calls(function: Callable[..., Any]) -> list[ast.Call]:
    """Return the calls in a function and in the private helpers of its module that it calls.

    A helper is a module-level function whose name starts with "_", such as ``_body`` in app.py,
    so a query parameter read inside a shared helper is found too.
    """
    namespace = function.__globals__
    found: list[ast.Call] = []
    pending = [function]
    seen: set[str] = set()
    while pending:
        current = pending.pop()
        tree = ast.parse(textwrap.dedent(inspect.getsource(current)))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            found.append(node)
            name = _call_name(node)
            helper = namespace.get(name) if isinstance(node.func, ast.Name) else None
            if (
                name is not None
                and name.startswith("_")
                and name not in seen
                and inspect.isfunction(helper)
                and helper.__globals__ is namespace
            ):
                seen.add(name)
                pending.append(helper)
    return found


def _literal_content_type(headers: ast.Dict) -> str | None:
    for key, value in zip(headers.keys, headers.values, strict=True):
        if (
            isinstance(key, ast.Constant)
            and str(key.value).lower() == "content-type"
            and isinstance(value, ast.Constant)
            and isinstance(value.value, str)
        ):
            return value.value
    return None


def inspect_view(view: Callable[..., Any]) -> RouteFacts:
    """Read a view function's source and return the facts listed in the module docstring."""
    function = inspect.unwrap(view)
    namespace = function.__globals__
    facts = RouteFacts()
    for node in _calls(function):
        for keyword in node.keywords:
            if keyword.arg == "headers" and isinstance(keyword.value, ast.Dict):
                facts.content_type = _literal_content_type(keyword.value) or facts.content_type
        name = _call_name(node)
        first = node.args[0] if node.args else None
        if name in ("_body", "parse_body") and first is not None and facts.body_model is None:
            model = _constant(first, namespace)
            if isinstance(model, type) and issubclass(model, BaseModel):
                facts.body_model = model
        elif name == "_replica":
            facts.replica_token = True
        elif name in DASHBOARD_TOKEN_CALLS:
            facts.dashboard_token = True
        elif name in ("query_int", "query_float") and len(node.args) >= 2:
            key = _constant(node.args[1], namespace)
            if isinstance(key, str):
                facts.query[key] = _query_parameter(node, name, namespace)
        elif (
            name == "get"
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "params"
            and isinstance(first, ast.Constant)
            and isinstance(first.value, str)
        ):
            facts.query.setdefault(first.value, {"type": "string", "maxLength": 4096})
    return facts


def _humanize(view_name: str) -> str:
    return view_name.replace("_", " ").capitalize()


def _path_parameter(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": "lowercase letters, digits and '-'",
        "schema": {"type": "string", "pattern": models.ID_PATTERN},
    }


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _request_body(model: type[BaseModel], content_types: list[str]) -> dict[str, Any]:
    reference = {"$ref": COMPONENT_REF.format(model=model.__name__)}
    return {
        "required": any(field.is_required() for field in model.model_fields.values()),
        "description": f"at most {MAX_BODY_BYTES} bytes",
        "content": {content_type: {"schema": reference} for content_type in content_types},
    }


def _responses(view_name: str, facts: RouteFacts) -> dict[str, Any]:
    response_model = RESPONSE_MODELS.get(view_name)
    content_type = RESPONSE_CONTENT_TYPES.get(view_name) or facts.content_type or "application/json"
    if response_model is not None:
        schema: dict[str, Any] = {"$ref": COMPONENT_REF.format(model=response_model.__name__)}
    elif content_type == "application/json":
        schema = {"type": "object"}
    else:
        schema = {"type": "string"}
    return {
        "200": {"description": "success", "content": {content_type: {"schema": schema}}},
        "default": _error_response("an error, with the status code of its kind (4xx or 5xx)"),
    }


def _security(entry: Any, facts: RouteFacts) -> list[dict[str, list[str]]]:
    if facts.replica_token:
        return [{"replicaToken": []}]
    if facts.dashboard_token:
        return [{"dashboardToken": []}]
    if type(entry.authorizer).__name__ == "IAMAuthorizer":
        return [{"sigv4": []}]
    return []


def _operation(entry: Any, facts: RouteFacts) -> dict[str, Any]:
    view_name = entry.view_name
    doc = inspect.getdoc(inspect.unwrap(entry.view_function))
    operation: dict[str, Any] = {
        "operationId": view_name,
        "summary": doc.splitlines()[0] if doc else _humanize(view_name),
    }

    parameters = [_path_parameter(name) for name in entry.view_args]
    parameters += [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in sorted(facts.query.items())
    ]
    if parameters:
        operation["parameters"] = parameters
    if facts.body_model is not None:
        operation["requestBody"] = _request_body(facts.body_model, entry.content_types)

    operation["responses"] = _responses(view_name, facts)
    operation["security"] = _security(entry, facts)
    return operation


def _component_schemas(used: list[type[BaseModel]]) -> dict[str, Any]:
    # Imported here, so a Lambda cold start that never serves /openapi.json does not load it.
    from pydantic.json_schema import models_json_schema

    unique = sorted(set(used), key=lambda model: model.__name__)
    modes = [(model, "validation") for model in unique]
    modes += [(model, "serialization") for model in RESPONSE_MODELS.values()]
    _, definitions = models_json_schema(modes, ref_template=COMPONENT_REF)
    schemas = dict(sorted(definitions.get("$defs", {}).items()))
    schemas["Error"] = ERROR_SCHEMA
    return schemas


def build_document(app: Any) -> dict[str, Any]:
    """Build the OpenAPI document of every route of a Chalice app."""
    paths: dict[str, Any] = {}
    body_models: list[type[BaseModel]] = []
    for path in sorted(app.routes):
        methods = app.routes[path]
        item: dict[str, Any] = {}
        for method in sorted(methods):
            entry = methods[method]
            facts = inspect_view(entry.view_function)
            if facts.body_model is not None:
                body_models.append(facts.body_model)
            item[method.lower()] = _operation(entry, facts)
        paths[path] = item
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": API_TITLE,
            "version": API_VERSION,
            "description": "Serverless control plane for batch LLM inference. User routes are "
            "signed with AWS SigV4; replica routes take the replica's bearer token.",
        },
        "paths": paths,
        "components": {
            "schemas": _component_schemas(body_models),
            "securitySchemes": SECURITY_SCHEMES,
        },
    }


_cached: dict[int, dict[str, Any]] = {}


def cached_document(app: Any) -> dict[str, Any]:
    """Return the document of ``app``, built on the first call of the process."""
    key = id(app)
    if key not in _cached:
        _cached[key] = build_document(app)
    return _cached[key]


def render(document: dict[str, Any]) -> str:
    """Serialise the document the way docs/openapi.json stores it."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    """Write the document to a file, or with ``--check`` compare the file with the code."""
    check = "--check" in argv
    targets = [arg for arg in argv if arg != "--check"]
    target = Path(targets[0] if targets else "docs/openapi.json")
    from app import app

    text = render(build_document(app))
    if check:
        current = target.read_text() if target.exists() else ""
        if current != text:
            print(f"{target} is out of date; run: python -m chalicelib.openapi {target}")
            return 1
        print(f"{target} is up to date")
        return 0
    target.write_text(text)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
