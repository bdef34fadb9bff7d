"""Client of the inference engine's OpenAI-compatible HTTP API (vLLM or llama.cpp's llama-server).

Both engines are treated the same: GET /health returns 200 once the model is loaded (llama.cpp
returns 503 while loading), GET /v1/models lists the served model, and completions are plain
non-streaming POSTs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx

from sidecar.retry import RetryPolicy

logger = logging.getLogger(__name__)

# A request that failed with a 5xx, 429 or network error is tried this many times in all.
ENGINE_TRIES = 3


class EngineNotReady(Exception):
    """The engine did not report healthy within the startup timeout."""


@dataclass(frozen=True)
class EngineResult:
    """The engine's final response to one request, after retries.

    ``status_code`` is None when no HTTP response arrived (``transport_error`` gives the reason).
    ``body`` is the decoded JSON body, or None when the response was not JSON.
    """

    status_code: int | None
    body: Any
    text: str = ""
    transport_error: str | None = None
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.status_code == 200 and isinstance(self.body, dict)


class EngineClient:
    def __init__(
        self,
        engine_url: str,
        *,
        concurrency: int = 8,
        request_timeout: float = 1800.0,
        retry: RetryPolicy | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        # Tries are bounded by count only, because one try may take up to request_timeout.
        self.retry = retry or RetryPolicy(max_attempts=ENGINE_TRIES, max_elapsed=float("inf"))
        # The engine runs on the same host, so proxy settings from the environment never apply.
        self._http = http or httpx.AsyncClient(
            base_url=engine_url.rstrip("/"),
            timeout=httpx.Timeout(request_timeout, connect=10.0),
            limits=httpx.Limits(
                max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4
            ),
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def health_status(self) -> tuple[int | None, str]:
        """Return the status of GET /health, or None and the error when the engine is unreachable."""
        try:
            response = await self._http.get("/health", timeout=10.0)
        except httpx.TransportError as error:
            return None, f"{type(error).__name__}: {error}"
        return response.status_code, response.text[:200]

    async def wait_until_ready(
        self, timeout: float, poll_interval: float = 2.0, log_ids: dict[str, Any] | None = None
    ) -> None:
        """Poll GET /health until it returns 200; raise EngineNotReady after ``timeout`` seconds."""
        log_ids = log_ids or {}
        deadline = time.monotonic() + timeout
        last_state: str | None = None
        polls = 0
        while True:
            status, detail = await self.health_status()
            polls += 1
            if status == 200:
                logger.info("engine is ready", extra={**log_ids, "health_polls": polls})
                return
            state = f"HTTP {status}" if status is not None else detail
            if state != last_state:
                # Logged once per change of state, so a long model load is a few lines.
                logger.info(
                    "engine is not ready yet",
                    extra={**log_ids, "engine_state": state, "health_polls": polls},
                )
                last_state = state
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EngineNotReady(
                    f"engine did not report healthy within {timeout:g} s; last /health "
                    f"result: {state}"
                )
            await asyncio.sleep(min(poll_interval, remaining))

    async def first_model_id(self) -> str:
        """Return the id of the first model that GET /v1/models lists."""
        response = await self._http.get("/v1/models", timeout=30.0)
        response.raise_for_status()
        models = response.json().get("data") or []
        if not models or not isinstance(models[0].get("id"), str):
            raise ValueError(f"GET /v1/models listed no model: {response.text[:200]}")
        return models[0]["id"]

    async def create_completion(
        self, path: str, body: dict[str, Any], log_ids: dict[str, Any] | None = None
    ) -> EngineResult:
        """POST ``body`` to ``path``; retry 429, 5xx and network errors up to the policy's tries.

        A 4xx other than 429 returns at once, because the same request would fail again.
        """
        log_ids = log_ids or {}
        started = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            try:
                response = await self._http.post(path, json=body)
            except httpx.TransportError as error:
                result = EngineResult(
                    None,
                    None,
                    transport_error=f"{type(error).__name__}: {error}",
                    attempts=attempts,
                )
            else:
                result = _result_of(response, attempts)
                if not _retryable(response.status_code):
                    return result
            delay = self.retry.delay(attempts)
            if not self.retry.allows_retry(attempts, time.monotonic() - started, delay):
                return result
            logger.warning(
                "engine request failed, retrying",
                extra={
                    **log_ids,
                    "attempt": attempts,
                    "retry_in_seconds": round(delay, 3),
                    "status_code": result.status_code,
                    "error": result.transport_error or result.text[:300],
                },
            )
            await asyncio.sleep(delay)


def _retryable(status_code: int) -> bool:
    return status_code == 429 or status_code >= 500


def _result_of(response: httpx.Response, attempts: int) -> EngineResult:
    try:
        body = response.json()
    except ValueError:
        body = None
    # The text is kept only for failures, where it goes into the error message.
    text = "" if response.status_code == 200 and body is not None else response.text[:2000]
    return EngineResult(response.status_code, body, text=text, attempts=attempts)
