"""Route plumbing: body parsing into pydantic models and error responses that name the field,
the value and the fix."""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import unquote

from botocore.exceptions import ClientError
from chalice import Response
from pydantic import BaseModel, ValidationError

from chalicelib.errors import ControlPlaneError, InvalidRequest, PayloadTooLarge
from chalicelib.models import ID_PATTERN, ID_RE

logger = logging.getLogger(__name__)

# Request bodies of this API are small JSON documents; input files travel through S3.
MAX_BODY_BYTES = 1024 * 1024
_QUERY_INTEGER = re.compile(r"-?[0-9]+")
Model = TypeVar("Model", bound=BaseModel)
# AWS error codes that mean "try again later": throttling, and the service's own 5xx. botocore's
# standard retry mode has already retried them (5 attempts in chalicelib/aws.py) when they reach
# a route, so the route returns 503 with Retry-After and the caller retries later.
RETRYABLE_AWS_ERRORS = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "Throttling",
        "RequestLimitExceeded",
        "TransactionInProgressException",
        "InternalServerError",
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
    }
)
RETRY_AFTER_SECONDS = 1


def _describe(value: Any) -> str:
    # Non-ASCII text is shown as the user wrote it ("😀", not "\ud83d\ude00"), and control
    # characters stay escaped.
    text = json.dumps(value, default=str, ensure_ascii=False)
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
    elif kind == "string_pattern_mismatch" and error.get("ctx", {}).get("pattern") == ID_PATTERN:
        message = (
            f"{location}: value {_describe(value)} is not a valid id; ids are 1 to 80 lowercase "
            "letters, digits and hyphens, starting with a letter or digit, as the API returned them"
        )
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


# DynamoDB stores numbers of at most 38 significant digits, between 1e-130 and 1e126 in magnitude.
_MIN_STORED_MAGNITUDE = 1e-130
_MAX_STORED_MAGNITUDE = 1e126
_MAX_STORED_INTEGER = 10**38


def _path(parent: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else str(key)


def _check_values(data: Any) -> None:
    """Reject numbers that DynamoDB cannot store and strings that are not valid Unicode.

    JSON allows any number and the escape of a lone UTF-16 surrogate ("\\ud800"), but DynamoDB
    rejects such numbers and the text cannot be encoded as UTF-8, so either would fail a write
    after the request was accepted. The walk is iterative, so deep nesting cannot overflow it.
    """
    pending: list[tuple[str, Any]] = [("", data)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(_path(path, key), key)
                pending.append((_path(path, key), item))
        elif isinstance(value, list):
            pending.extend((_path(path, index), item) for index, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(path, value)
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int) and abs(value) >= _MAX_STORED_INTEGER:
            raise InvalidRequest(
                f"{path or 'body'}: integer {_describe(value)} has more than 38 digits; "
                "use a smaller number",
                field=path or "body",
            )
        elif (
            isinstance(value, float)
            and value != 0
            and not (_MIN_STORED_MAGNITUDE <= abs(value) < _MAX_STORED_MAGNITUDE)
        ):
            raise InvalidRequest(
                f"{path or 'body'}: number {value!r} is out of range; numbers must be 0 or "
                "between 1e-130 and 1e126 in magnitude",
                field=path or "body",
            )


def _check_text(path: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRequest(
            f"{path or 'body'}: text contains an unpaired UTF-16 surrogate escape at character "
            f"{error.start + 1}; send valid Unicode text",
            field=path or "body",
        ) from error


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
        except RecursionError as error:
            raise InvalidRequest(
                "request body is nested too deeply to parse; flatten the JSON"
            ) from error
    if not isinstance(data, dict):
        kind = "null" if data is None else type(data).__name__
        raise InvalidRequest(f"request body must be a JSON object, got {kind}")
    try:
        parsed = model.model_validate(data)
    except ValidationError as error:
        errors = [_field_error(e, model) for e in error.errors(include_url=False)]
        raise InvalidRequest("; ".join(e["message"] for e in errors), errors=errors) from error
    # After the model's own checks, whose messages name the field's allowed range.
    _check_values(data)
    return parsed


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
    # int() also accepts "1_000", surrounding spaces and non-ASCII digits; only plain decimal
    # digits are an integer here.
    if not _QUERY_INTEGER.fullmatch(raw):
        raise InvalidRequest(f"query parameter {name} {raw[:40]!r} is not an integer", field=name)
    # The length check comes first because int() rejects strings of more than 4300 digits.
    if len(raw) > 40 or not low <= int(raw) <= high:
        raise InvalidRequest(
            f"query parameter {name} {raw[:40]} is out of range; use {low} to {high}", field=name
        )
    return int(raw)


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
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code not in RETRYABLE_AWS_ERRORS:
                raise
            operation = getattr(error, "operation_name", "")
            logger.warning(
                "AWS request failed after retries, returning 503",
                extra={"aws_error": code, "operation": operation, **kwargs},
            )
            body = {
                "code": "service_unavailable",
                "message": f"{operation} failed with {code} after retries; retry the request",
                "retry_after_seconds": RETRY_AFTER_SECONDS,
            }
            return Response(
                body=body,
                status_code=503,
                headers={
                    "Content-Type": "application/json",
                    "Retry-After": str(RETRY_AFTER_SECONDS),
                },
            )

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
