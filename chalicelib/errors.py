"""Named errors of the control plane, each with the HTTP status a route answers with."""

from __future__ import annotations

from typing import Any


class ControlPlaneError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        body.update(self.details)
        return body


class InvalidRequest(ControlPlaneError):
    status_code = 400
    code = "invalid_request"


class InvalidInput(ControlPlaneError):
    """The uploaded JSONL file breaks a rule; ``errors`` lists the lines."""

    status_code = 400
    code = "invalid_input"


class Unauthorized(ControlPlaneError):
    status_code = 401
    code = "unauthorized"


class Forbidden(ControlPlaneError):
    status_code = 403
    code = "forbidden"


class NotFound(ControlPlaneError):
    status_code = 404
    code = "not_found"


class Conflict(ControlPlaneError):
    status_code = 409
    code = "conflict"


class LeaseLost(Conflict):
    """The lease token no longer matches the chunk: it was reclaimed, released or completed."""

    code = "lease_lost"


class PayloadTooLarge(ControlPlaneError):
    status_code = 413
    code = "payload_too_large"


class Busy(ControlPlaneError):
    """A transient overload (a hot item lost too many races); the client should retry."""

    status_code = 503
    code = "busy"
