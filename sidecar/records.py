"""Input request lines and output records in the OpenAI Batch API's JSONL format.

Each input line is ``{"custom_id", "method", "url", "body"}``. Each output record is
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``, where
``error`` is null on success and ``{"code", "message"}`` when the request failed.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from sidecar.engine import EngineResult

SUPPORTED_URLS = frozenset({"/v1/chat/completions", "/v1/completions"})

# Failure codes in output records.
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
INVALID_REQUEST = "invalid_request"
ENGINE_ERROR = "engine_error"
ENGINE_UNAVAILABLE = "engine_unavailable"

# llama.cpp answers "the request exceeds the available context size" (error type
# exceed_context_size_error); vLLM answers "This model's maximum context length is N tokens".
_CONTEXT_MESSAGE = re.compile(r"context (size|length|window)", re.IGNORECASE)
_CONTEXT_ERROR_TYPES = frozenset({"exceed_context_size_error", "context_length_exceeded"})


@dataclass(frozen=True)
class BatchRequest:
    """One valid input line."""

    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass(frozen=True)
class InvalidLine:
    """An input line that cannot be sent; it still gets an output record, in its place."""

    custom_id: str | None
    message: str


def parse_chunk(data: bytes) -> list[BatchRequest | InvalidLine]:
    """Parse a chunk's bytes into requests in input order, skipping whitespace-only lines."""
    items: list[BatchRequest | InvalidLine] = []
    for raw in data.split(b"\n"):
        if raw.strip():
            items.append(parse_line(raw, f"request {len(items) + 1} of the chunk"))
    return items


def parse_line(raw: bytes, label: str) -> BatchRequest | InvalidLine:
    """Parse one input line; ``label`` names the line in error messages."""
    try:
        entry = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as error:
        return InvalidLine(None, f"{label} is not valid JSON: {error}")
    if not isinstance(entry, dict):
        return InvalidLine(None, f"{label} is not a JSON object")
    custom_id = entry.get("custom_id")
    if not isinstance(custom_id, str):
        return InvalidLine(None, f"{label} has no string custom_id")
    url = entry.get("url")
    if url not in SUPPORTED_URLS:
        supported = ", ".join(sorted(SUPPORTED_URLS))
        return InvalidLine(custom_id, f"{label} has url {url!r}; expected one of {supported}")
    method = entry.get("method", "POST")
    if not isinstance(method, str) or method.upper() != "POST":
        return InvalidLine(custom_id, f"{label} has method {method!r}; expected POST")
    body = entry.get("body")
    if not isinstance(body, dict):
        return InvalidLine(custom_id, f"{label} has no JSON object body")
    return BatchRequest(custom_id, url, body)


def prepare_body(
    body: dict[str, Any], served_model: str, max_output_tokens: int | None
) -> dict[str, Any]:
    """Return a copy of ``body`` to send to the engine.

    The model is replaced by the served model and streaming is turned off. When
    ``max_output_tokens`` is set, ``max_tokens`` and ``max_completion_tokens`` are capped at it,
    and ``max_tokens`` is set to it when the body has neither.
    """
    prepared = copy.deepcopy(body)
    prepared["model"] = served_model
    prepared["stream"] = False
    # vLLM rejects stream_options unless stream is true.
    prepared.pop("stream_options", None)
    if max_output_tokens is not None:
        limits = [key for key in ("max_tokens", "max_completion_tokens") if key in prepared]
        if not limits:
            prepared["max_tokens"] = max_output_tokens
        for key in limits:
            value = prepared[key]
            if value is None or (isinstance(value, int) and value > max_output_tokens):
                prepared[key] = max_output_tokens
    return prepared


def new_record_id() -> str:
    return f"batch_req_{secrets.token_hex(16)}"


def _new_request_id() -> str:
    return f"req_{secrets.token_hex(16)}"


def success_record(custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
    request_id = body.get("id") if isinstance(body.get("id"), str) else _new_request_id()
    return {
        "id": new_record_id(),
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": request_id, "body": body},
        "error": None,
    }


def failure_record(
    custom_id: str | None, status_code: int | None, body: Any, code: str, message: str
) -> dict[str, Any]:
    return {
        "id": new_record_id(),
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": _new_request_id(), "body": body},
        "error": {"code": code, "message": message},
    }


def invalid_line_record(line: InvalidLine) -> dict[str, Any]:
    return failure_record(line.custom_id, None, None, INVALID_REQUEST, line.message)


def record_for_result(custom_id: str, result: EngineResult) -> dict[str, Any]:
    """Build the output record for the engine's final response to one request."""
    if result.ok:
        return success_record(custom_id, result.body)
    code, message = classify_failure(result)
    return failure_record(custom_id, result.status_code, result.body, code, message)


def classify_failure(result: EngineResult) -> tuple[str, str]:
    """Return the error code and message of a failed engine request."""
    if result.status_code is None:
        return ENGINE_UNAVAILABLE, (
            f"engine unreachable after {result.attempts} tries: {result.transport_error}"
        )
    message = engine_error_message(result)
    if result.status_code == 200:
        return ENGINE_ERROR, f"engine returned HTTP 200 without a JSON object body: {message}"
    if 400 <= result.status_code < 500 and result.status_code != 429:
        if _is_context_error(result.body, message):
            return CONTEXT_LENGTH_EXCEEDED, message
        return INVALID_REQUEST, message
    return ENGINE_ERROR, (
        f"engine returned HTTP {result.status_code} after {result.attempts} tries: {message}"
    )


def engine_error_message(result: EngineResult) -> str:
    """Return the message of an engine error body (OpenAI, vLLM and llama.cpp shapes)."""
    body = result.body
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
        if isinstance(body.get("message"), str):
            return body["message"]
    return result.text[:500] or f"HTTP {result.status_code}"


def _is_context_error(body: Any, message: str) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and (
        error.get("type") in _CONTEXT_ERROR_TYPES or error.get("code") in _CONTEXT_ERROR_TYPES
    ):
        return True
    return bool(_CONTEXT_MESSAGE.search(message))


def encode_jsonl(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(record).encode() + b"\n" for record in records)
