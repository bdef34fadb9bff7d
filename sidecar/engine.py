"""Client of the inference engine's OpenAI-compatible HTTP API (vLLM or llama.cpp's llama-server).

Both engines are treated the same: GET /health returns 200 once the model is loaded (llama.cpp
returns 503 while loading), GET /v1/models lists the served model, and completions are
non-streaming POSTs. When the sidecar measures latencies itself (an engine without vLLM's
latency metrics, see sidecar/telemetry.py) completions are streamed, and the final body is
assembled from the stream in the non-streamed shape, so output records look the same.
"""

from __future__ import annotations

import asyncio
import json
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
        stream_http: httpx.AsyncClient | None = None,
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
        # llama.cpp's llama-server closes the connection after a streamed response although it
        # sent Keep-Alive, so a pooled connection would fail the next request with
        # RemoteProtocolError; streamed requests therefore use a pool without keep-alive.
        self._stream_http = stream_http or httpx.AsyncClient(
            base_url=engine_url.rstrip("/"),
            timeout=httpx.Timeout(request_timeout, connect=10.0),
            limits=httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0),
            trust_env=False,
        )
        self.streaming = False
        # Receives token counts and latencies of every request (sidecar.telemetry.ClientMetrics).
        self.observer: Any = None

    def enable_streaming(self) -> None:
        """Stream completions from now on, so the observer gets time to first token."""
        self.streaming = True

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._stream_http.aclose()

    async def metrics_text(self) -> str | None:
        """Return the engine's Prometheus page (GET /metrics), or None when it has none."""
        try:
            response = await self._http.get("/metrics", timeout=10.0)
        except httpx.TransportError:
            return None
        if response.status_code != 200:
            return None
        return response.text

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
                if self.streaming:
                    result = await self._post_streaming(path, body, attempts)
                else:
                    sent = time.monotonic()
                    response = await self._http.post(path, json=body)
                    result = _result_of(response, attempts)
                    self._observe(result, time.monotonic() - sent, None, 0)
            except httpx.TransportError as error:
                result = EngineResult(
                    None,
                    None,
                    transport_error=f"{type(error).__name__}: {error}",
                    attempts=attempts,
                )
            else:
                if result.status_code is not None and not _retryable(result.status_code):
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

    async def _post_streaming(self, path: str, body: dict[str, Any], attempts: int) -> EngineResult:
        """POST with ``stream: true`` and assemble the non-streamed response body from the events.

        An engine that answers with plain JSON anyway (or an error status) is read as usual.
        """
        streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
        sent = time.monotonic()
        first_token: float | None = None
        async with self._stream_http.stream("POST", path, json=streamed) as response:
            if response.status_code != 200 or "text/event-stream" not in response.headers.get(
                "content-type", ""
            ):
                await response.aread()
                result = _result_of(response, attempts)
                self._observe(result, time.monotonic() - sent, None, 0)
                return result
            assembler = StreamAssembler(chat=path.endswith("/chat/completions"))
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                try:
                    event = json.loads(data)
                except ValueError:
                    continue
                if isinstance(event, dict) and "error" in event:
                    error = event["error"]
                    code = error.get("code") if isinstance(error, dict) else None
                    status = code if isinstance(code, int) and code >= 400 else 500
                    return EngineResult(status, event, text=data[:2000], attempts=attempts)
                if assembler.add(event):
                    if first_token is None:
                        first_token = time.monotonic()
                    # NOTE: tokens of an attempt that breaks off and is retried stay counted,
                    # so live token totals can exceed usage after engine connection failures.
                    if self.observer is not None:
                        self.observer.observe_tokens(1)
        result = EngineResult(200, assembler.body(), attempts=attempts)
        ttft = None if first_token is None else first_token - sent
        self._observe(result, time.monotonic() - sent, ttft, assembler.content_events)
        return result

    def _observe(
        self, result: EngineResult, seconds: float, ttft: float | None, streamed_tokens: int
    ) -> None:
        if self.observer is None:
            return
        usage = result.body.get("usage") if isinstance(result.body, dict) else None
        self.observer.observe_request(
            ok=result.ok,
            e2e_seconds=seconds,
            ttft_seconds=ttft,
            streamed_tokens=streamed_tokens,
            usage=usage if isinstance(usage, dict) else None,
        )


class StreamAssembler:
    """Builds a chat or text completion body from the chunks of a streamed response.

    The result has the non-streamed OpenAI shape: ``choices[0].message.content`` (chat) or
    ``choices[0].text`` (completions), ``finish_reason`` and ``usage``. Only choice 0 is kept,
    and tool-call deltas are not assembled.
    """

    def __init__(self, *, chat: bool) -> None:
        self.chat = chat
        self.header: dict[str, Any] = {}
        self.role = "assistant"
        self.parts: list[str] = []
        self.reasoning: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.extra: dict[str, Any] = {}
        self.content_events = 0

    def add(self, event: Any) -> bool:
        """Adds one stream event; returns True when it carried generated text."""
        if not isinstance(event, dict):
            return False
        for key in ("id", "created", "model", "system_fingerprint"):
            if key in event and key not in self.header:
                self.header[key] = event[key]
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        if "timings" in event:
            self.extra["timings"] = event["timings"]
        carried = False
        for choice in event.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            if self.chat:
                delta = choice.get("delta") or {}
                if isinstance(delta.get("role"), str):
                    self.role = delta["role"]
                text = delta.get("content")
                if isinstance(delta.get("reasoning_content"), str):
                    self.reasoning.append(delta["reasoning_content"])
                    carried = carried or bool(delta["reasoning_content"])
            else:
                text = choice.get("text")
            if isinstance(text, str) and text:
                self.parts.append(text)
                carried = True
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        if carried:
            self.content_events += 1
        return carried

    def body(self) -> dict[str, Any]:
        text = "".join(self.parts)
        if self.chat:
            message: dict[str, Any] = {"role": self.role, "content": text}
            if self.reasoning:
                message["reasoning_content"] = "".join(self.reasoning)
            choice: dict[str, Any] = {
                "index": 0,
                "message": message,
                "finish_reason": self.finish_reason,
            }
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": self.finish_reason}
            kind = "text_completion"
        body: dict[str, Any] = {**self.header, "object": kind, "choices": [choice]}
        if self.usage is not None:
            body["usage"] = self.usage
        body.update(self.extra)
        return body


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
