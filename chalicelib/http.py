"""Route plumbing: body parsing into pydantic models and error responses that name the field,
the value and the fix."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import unquote

from chalice import Response
from pydantic import BaseModel, ValidationError

from chalicelib.errors import ControlPlaneError, InvalidRequest, PayloadTooLarge
from chalicelib.models import ID_RE

logger = logging.getLogger(__name__)

# Request bodies of this API are small JSON documents; input files travel through S3.
MAX_BODY_BYTES = 1024 * 1024
Model = TypeVar("Model", bound=BaseModel)


def _describe(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _field_error(error: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    location = ".".join(str(part) for part in error.get("loc", ())) or "body"
    kind = error.get("type", "")
    value = error.get("input")
    if kind == "extra_forbidden":
        allowed = ", ".join(sorted(model.model_fields))
        message = f"unknown field {location!r}; allowed fields are: {allowed}"
    elif kind == "missing":
        message = f"field {location!r} is required"
    else:
        reason = error.get("msg", "is invalid")
        reason = reason.removeprefix("Value error, ")
        message = f"{location}: value {_describe(value)} is invalid: {reason}"
    entry: dict[str, Any] = {"field": location, "message": message}
    if kind != "missing":
        entry["value"] = (
            value if isinstance(value, (str, int, float, bool, type(None))) else _describe(value)
        )
    return entry


def _reject_constant(name: str) -> Any:
    # Python's json module accepts NaN and Infinity, which JSON does not allow.
    raise ValueError(f"{name} is not valid JSON; numbers must be finite")


def parse_body(model: type[Model], raw_body: bytes | None) -> Model:
    raw = raw_body or b""
    if len(raw) > MAX_BODY_BYTES:
        raise PayloadTooLarge(
            f"request body is {len(raw)} bytes, more than the limit of {MAX_BODY_BYTES} bytes"
        )
    if not raw.strip():
        data: Any = {}
    else:
        try:
            data = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as error:
            raise InvalidRequest(f"request body is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        kind = "null" if data is None else type(data).__name__
        raise InvalidRequest(f"request body must be a JSON object, got {kind}")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        errors = [_field_error(e, model) for e in error.errors(include_url=False)]
        raise InvalidRequest("; ".join(e["message"] for e in errors), errors=errors) from error


def path_id(value: str, name: str) -> str:
    decoded = unquote(value)
    if not ID_RE.match(decoded):
        raise InvalidRequest(
            f"{name} {decoded[:80]!r} is not a valid id; ids use lowercase letters, digits and '-'",
            field=name,
        )
    return decoded


def query_int(params: dict[str, str] | None, name: str, default: int, low: int, high: int) -> int:
    raw = (params or {}).get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as error:
        raise InvalidRequest(
            f"query parameter {name} {raw[:40]!r} is not an integer", field=name
        ) from error
    if not low <= value <= high:
        raise InvalidRequest(
            f"query parameter {name} {value} is out of range; use {low} to {high}", field=name
        )
    return value


def json_response(body: Any, status_code: int = 200) -> Response:
    return Response(
        body=body, status_code=status_code, headers={"Content-Type": "application/json"}
    )


def handle_errors(view: Callable[..., Any]) -> Callable[..., Any]:
    """Turns the control plane's named errors into JSON responses with their status code."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return view(*args, **kwargs)
        except ControlPlaneError as error:
            if error.status_code >= 500:
                logger.exception("request failed")
            else:
                logger.info(
                    "request rejected", extra={"status": error.status_code, "error": error.message}
                )
            return json_response(error.to_body(), error.status_code)

    return wrapper


def query_float(
    params: dict[str, str] | None, name: str, low: float = 0.0, high: float = 1e12
) -> float | None:
    """Returns the query parameter ``name`` as a float, None when absent."""
    raw = (params or {}).get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError as error:
        raise InvalidRequest(
            f"query parameter {name} {raw[:40]!r} is not a number", field=name
        ) from error
    if not low <= value <= high:
        raise InvalidRequest(
            f"query parameter {name} {value:g} is out of range; use {low:g} to {high:g}", field=name
        )
    return value
