"""Client of the control plane's replica routes (``/job/{job_id}/...``), authenticated by token.

Network errors, timeouts, 429 and 5xx are retried with backoff. Any other 4xx is raised at once
as ``RequestRejected`` (``LeaseLost`` for a 409 with code ``lease_lost``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict

from sidecar.retry import RetryPolicy

logger = logging.getLogger(__name__)

Phase = Literal[
    "loading_model", "model_ready", "generating", "draining", "replica_complete", "startup_failed"
]
ReleaseReason = Literal["drain", "shutdown", "error"]

# The control plane rejects a release error or a phase reason longer than this.
MAX_REASON_CHARS = 2000
_SEND_ONCE = RetryPolicy(max_attempts=1)
_HEARTBEAT_RETRY = RetryPolicy(max_attempts=2)


class ControlPlaneError(Exception):
    """A control-plane request that did not succeed."""


class RequestRejected(ControlPlaneError):
    """The control plane responded with a 4xx other than 429, so retrying would not help."""

    def __init__(self, status_code: int, code: str, message: str, body: Any = None) -> None:
        super().__init__(f"HTTP {status_code} {code}: {message}")
        self.status_code = status_code
        self.code = code
        self.message = message
        self.body = body


class LeaseLost(RequestRejected):
    """The lease token is no longer valid for the chunk, which was reclaimed, released or completed."""


class ControlPlaneUnavailable(ControlPlaneError):
    """Network errors, timeouts, 429 or 5xx persisted through every retry."""

    def __init__(self, message: str, status_code: int | None, attempts: int) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.attempts = attempts


class Lease(BaseModel):
    """A chunk leased to this replica, as returned by ``POST /job/{job_id}/chunks/pull``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    job_id: str
    chunk_id: str
    chunk_index: int
    first_line: int
    last_line: int
    byte_start: int
    byte_end: int  # exclusive
    num_lines: int
    input_bucket: str
    input_key: str
    input_etag: str | None = None
    lease_token: str
    lease_expires_at: float
    lease_seconds: float
    attempt: int = 1
    retry_count: int = 0
    output_bucket: str
    output_key: str
    model_name: str | None = None
    max_output_tokens: int | None = None


class Progress(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    total: int
    pending: int
    inflight: int
    completed: int
    failed: int
    all_done: bool


class ControlPlaneClient:
    def __init__(
        self,
        api_url: str,
        job_id: str,
        replica_id: str,
        token: str,
        *,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.job_id = job_id
        self.replica_id = replica_id
        self.retry = retry or RetryPolicy()
        # The token lives only in this header; it is never logged or put in a URL.
        self._headers = {"Authorization": f"Bearer {token}"}
        self._http = http or httpx.AsyncClient(
            base_url=api_url.rstrip("/"),
            timeout=httpx.Timeout(timeout, connect=10.0),
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def report_phase(self, phase: Phase, reason: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"phase": phase, "replica_id": self.replica_id}
        if reason is not None:
            body["reason"] = reason[:MAX_REASON_CHARS]
        response = await self._call("POST", "phase", body)
        return response.json()

    async def pull(self) -> Lease | None:
        """Lease the next chunk, or return None when nothing is pending now (HTTP 204)."""
        response = await self._call("POST", "chunks/pull", {"replica_id": self.replica_id})
        if response.status_code == 204 or not response.content:
            return None
        return Lease.model_validate(response.json())

    async def renew(self, lease: Lease, retry: RetryPolicy | None = None) -> float:
        """Extend the lease and return its new expiry (Unix seconds)."""
        response = await self._call(
            "POST", "chunks/renew", self._lease_body(lease), retry=retry, chunk_id=lease.chunk_id
        )
        return float(response.json()["lease_expires_at"])

    async def complete(
        self,
        lease: Lease,
        succeeded: int,
        failed: int,
        prompt_tokens: int = 0,
        generation_tokens: int = 0,
    ) -> dict[str, Any]:
        body = {
            **self._lease_body(lease),
            "output_key": lease.output_key,
            "requests_succeeded": succeeded,
            "requests_failed": failed,
            "prompt_tokens": prompt_tokens,
            "generation_tokens": generation_tokens,
        }
        response = await self._call("POST", "chunks/complete", body, chunk_id=lease.chunk_id)
        return response.json()

    async def release(
        self, lease: Lease, reason: ReleaseReason, error: str | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {**self._lease_body(lease), "reason": reason}
        if error is not None:
            body["error"] = error[:MAX_REASON_CHARS]
        response = await self._call("POST", "chunks/release", body, chunk_id=lease.chunk_id)
        return response.json()

    async def ingest_metrics(
        self, session: str, snapshots: list[dict[str, Any]], dropped: int
    ) -> dict[str, Any]:
        """Send metric snapshots once, without retries: the telemetry loop sends them again."""
        body = {
            "replica_id": self.replica_id,
            "session": session,
            "snapshots": snapshots,
            "dropped_snapshots": dropped,
        }
        response = await self._call("POST", "metrics/ingest", body, retry=_SEND_ONCE)
        return response.json()

    async def post_metrics_summary(
        self, metrics: dict[str, Any], retry: RetryPolicy | None = None
    ) -> dict[str, Any]:
        body = {"replica_id": self.replica_id, "metrics": metrics}
        response = await self._call("POST", "metrics/summary", body, retry=retry)
        return response.json()

    async def progress(self) -> Progress:
        response = await self._call("GET", "chunks/progress")
        return Progress.model_validate(response.json())

    async def heartbeat(self) -> dict[str, Any]:
        """Report that this replica is alive; the answer's ``action`` is continue or drain."""
        # One retry at most: the next heartbeat follows within seconds.
        response = await self._call(
            "POST", "heartbeat", {"replica_id": self.replica_id}, retry=_HEARTBEAT_RETRY
        )
        return response.json()

    def _lease_body(self, lease: Lease) -> dict[str, Any]:
        return {
            "replica_id": self.replica_id,
            "chunk_id": lease.chunk_id,
            "lease_token": lease.lease_token,
        }

    async def _call(
        self,
        method: str,
        route: str,
        body: dict[str, Any] | None = None,
        *,
        retry: RetryPolicy | None = None,
        chunk_id: str | None = None,
    ) -> httpx.Response:
        """Send one request, retrying network errors, timeouts, 429 and 5xx with backoff."""
        policy = retry or self.retry
        path = f"/job/{self.job_id}/{route}"
        log_ids = {"job_id": self.job_id, "replica_id": self.replica_id}
        if chunk_id is not None:
            log_ids["chunk_id"] = chunk_id
        started = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            retry_after: float | None = None
            try:
                response = await self._http.request(method, path, json=body, headers=self._headers)
            except httpx.TransportError as error:
                status_code = None
                failure = f"{type(error).__name__}: {error}"
            else:
                status_code = response.status_code
                if status_code < 400:
                    return response
                if status_code != 429 and status_code < 500:
                    raise _rejection(response)
                failure = f"HTTP {status_code}: {_error_message(response)}"
                retry_after = _retry_after_seconds(response)
            delay = policy.delay(attempts)
            if retry_after is not None:
                delay = min(max(delay, retry_after), policy.max_delay)
            if not policy.allows_retry(attempts, time.monotonic() - started, delay):
                # The caller logs the raised error, together with what it does next.
                raise ControlPlaneUnavailable(
                    f"{method} {path} failed after {attempts} attempts: {failure}",
                    status_code,
                    attempts,
                )
            logger.warning(
                "control-plane request failed, retrying",
                extra={
                    **log_ids,
                    "route": route,
                    "attempt": attempts,
                    "retry_in_seconds": round(delay, 3),
                    "error": failure,
                },
            )
            await asyncio.sleep(delay)


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _error_message(response: httpx.Response) -> str:
    body = _json_or_none(response)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return response.text[:500] or response.reason_phrase


def _rejection(response: httpx.Response) -> RequestRejected:
    body = _json_or_none(response)
    code = body.get("code") if isinstance(body, dict) else None
    code = code if isinstance(code, str) else f"http_{response.status_code}"
    message = _error_message(response)
    if response.status_code == 409 and code == "lease_lost":
        return LeaseLost(response.status_code, code, message, body)
    return RequestRejected(response.status_code, code, message, body)


def _retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
