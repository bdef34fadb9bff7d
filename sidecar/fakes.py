"""In-process fakes of the control plane and of an OpenAI-compatible engine, for tests and benchmarks.

Both are ``ThreadingHTTPServer``s bound to 127.0.0.1 on a free port, and both record every
request they receive. Nothing here is used by the sidecar itself.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _JsonHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle's algorithm on, the body waits for
    # the client's delayed ACK (about 40 ms on Linux).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        return

    def send_json(self, status: int, payload: Any) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def read_json(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw else {}


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 served from a daemon thread."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def make_lease(
    job_id: str,
    index: int,
    *,
    input_bucket: str,
    input_key: str,
    byte_start: int,
    byte_end: int,
    first_line: int,
    num_lines: int,
    output_bucket: str,
    input_etag: str | None = None,
    lease_seconds: float = 300.0,
    max_output_tokens: int | None = None,
) -> dict[str, Any]:
    """Build a pull response body the way the control plane shapes it."""
    chunk_id = f"c{index:06d}"
    token = secrets.token_urlsafe(16)
    return {
        "job_id": job_id,
        "chunk_id": chunk_id,
        "chunk_index": index,
        "status": "inflight",
        "first_line": first_line,
        "last_line": first_line + num_lines - 1,
        "byte_start": byte_start,
        "byte_end": byte_end,
        "num_lines": num_lines,
        "input_bucket": input_bucket,
        "input_key": input_key,
        "input_etag": input_etag,
        "lease_token": token,
        "lease_expires_at": time.time() + lease_seconds,
        "lease_seconds": lease_seconds,
        "attempt": 1,
        "retry_count": 0,
        "output_bucket": output_bucket,
        "output_key": f"jobs/{job_id}/chunks/{chunk_id}/{token}.jsonl",
        "model_name": "org/model",
        "max_output_tokens": max_output_tokens,
    }


def split_into_leases(
    job_id: str,
    data: bytes,
    chunk_size: int,
    *,
    input_bucket: str,
    input_key: str,
    output_bucket: str,
    **lease_options: Any,
) -> list[dict[str, Any]]:
    """Split a JSONL file into chunks of ``chunk_size`` lines and return one lease per chunk."""
    leases = []
    offsets = [0]
    for position, byte in enumerate(data):
        if byte == ord("\n"):
            offsets.append(position + 1)
    if offsets[-1] != len(data):
        offsets.append(len(data))
    line_count = len(offsets) - 1
    for index, first in enumerate(range(0, line_count, chunk_size)):
        last = min(first + chunk_size, line_count)
        leases.append(
            make_lease(
                job_id,
                index,
                input_bucket=input_bucket,
                input_key=input_key,
                byte_start=offsets[first],
                byte_end=offsets[last],
                first_line=first + 1,
                num_lines=last - first,
                output_bucket=output_bucket,
                **lease_options,
            )
        )
    return leases


@dataclass
class FakeControlPlane:
    """The replica routes of the control plane over an in-memory queue of leases.

    ``fail_next(route, status, ...)`` makes the next calls to a route return an error first.
    ``lose_on_renew`` contains the chunk ids whose renewals return 409 lease_lost. ``all_done`` is true
    once no lease is pending or held, unless ``all_done_override`` is set.
    """

    job_id: str
    token: str
    leases: list[dict[str, Any]] = field(default_factory=list)
    all_done_override: bool | None = None

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: deque[dict[str, Any]] = deque(self.leases)
        self.held: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, Any]] = []
        self.phases: list[str] = []
        self.completed: dict[str, dict[str, Any]] = {}
        self.released: list[dict[str, Any]] = []
        self.lose_on_renew: set[str] = set()
        self.call_times: dict[str, list[float]] = {}
        self._scripted: dict[str, deque[tuple[int, Any]]] = {}
        self._server = _Server(self._handler())

    @property
    def url(self) -> str:
        return self._server.url

    def start(self) -> FakeControlPlane:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def fail_next(self, route: str, status: int, body: Any = None, times: int = 1) -> None:
        body = body if body is not None else {"code": f"http_{status}", "message": "injected"}
        with self.lock:
            queue = self._scripted.setdefault(route, deque())
            queue.extend([(status, body)] * times)

    def calls_to(self, route: str) -> list[Any]:
        with self.lock:
            return [body for name, body in self.calls if name == route]

    def progress(self) -> dict[str, Any]:
        total = len(self.leases)
        done = not self.pending and not self.held
        if self.all_done_override is not None:
            done = self.all_done_override
        return {
            "total": total,
            "pending": len(self.pending),
            "inflight": len(self.held),
            "completed": len(self.completed),
            "failed": 0,
            "all_done": done,
        }

    def handle(
        self, method: str, route: str, body: Any, authorization: str | None
    ) -> tuple[int, Any]:
        with self.lock:
            self.calls.append((route, body))
            self.call_times.setdefault(route, []).append(time.monotonic())
            if authorization != f"Bearer {self.token}":
                return 401, {"code": "unauthorized", "message": "replica token is not valid"}
            scripted = self._scripted.get(route)
            if scripted:
                return scripted.popleft()
            if route == "phase":
                self.phases.append(body["phase"])
                return 200, {"ok": True, "replica_phase": body["phase"]}
            if route == "chunks/pull":
                if not self.pending:
                    return 204, None
                lease = self.pending.popleft()
                self.held[lease["chunk_id"]] = lease
                return 200, lease
            if route == "chunks/progress":
                return 200, self.progress()
            if route == "metrics/ingest":
                return 200, {"ok": True, "ingested": len(body.get("snapshots") or [])}
            if route == "metrics/summary":
                return 200, {"ok": True}
            return self._lease_route(route, body)

    def _lease_route(self, route: str, body: dict[str, Any]) -> tuple[int, Any]:
        chunk_id = body.get("chunk_id")
        lease = self.held.get(chunk_id)
        current = lease is not None and lease["lease_token"] == body.get("lease_token")
        if route == "chunks/complete":
            if chunk_id in self.completed:
                return 200, {"status": "already_completed", **self.progress()}
            if not current:
                return 409, {"code": "lease_lost", "message": f"lease on {chunk_id} is gone"}
            self.held.pop(chunk_id)
            self.completed[chunk_id] = body
            return 200, {"status": "completed", **self.progress()}
        if not current:
            return 409, {"code": "lease_lost", "message": f"lease on {chunk_id} is gone"}
        if route == "chunks/renew":
            if chunk_id in self.lose_on_renew:
                # The chunk went to someone else, so it leaves this replica's books.
                self.held.pop(chunk_id)
                return 409, {"code": "lease_lost", "message": f"lease on {chunk_id} was reclaimed"}
            return 200, {"renewed": True, "lease_expires_at": time.time() + lease["lease_seconds"]}
        if route == "chunks/release":
            self.held.pop(chunk_id)
            self.released.append(body)
            return 200, {"released": True, "chunk_id": chunk_id}
        return 404, {"code": "not_found", "message": f"no route {route}"}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self
        prefix = f"/job/{self.job_id}/"

        class Handler(_JsonHandler):
            def _dispatch(self, method: str) -> None:
                if not self.path.startswith(prefix):
                    self.send_json(404, {"code": "not_found", "message": f"no route {self.path}"})
                    return
                body = self.read_json() if method == "POST" else None
                status, payload = fake.handle(
                    method, self.path[len(prefix) :], body, self.headers.get("Authorization")
                )
                self.send_json(status, payload)

            def do_GET(self) -> None:
                self._dispatch("GET")

            def do_POST(self) -> None:
                self._dispatch("POST")

        return Handler


@dataclass(frozen=True)
class ServedRequest:
    """One completion request as the fake engine saw it; times are ``time.monotonic()``."""

    path: str
    body: dict[str, Any]
    status: int
    slot_start: float | None
    slot_end: float | None


class FakeEngine:
    """An OpenAI-compatible engine with ``slots`` slots.

    A request waits for a free slot and occupies it for ``max_tokens * ms_per_token`` ms. Prompts
    longer than ``context_chars`` get HTTP 400, as llama.cpp responds to them. When
    ``responder(path, body)`` returns ``(status, payload)``, that is the response and no slot is
    used. GET /health returns ``health_status``.
    """

    def __init__(
        self,
        *,
        slots: int = 8,
        ms_per_token: float = 1.0,
        context_chars: int = 100_000,
        model_id: str = "fake-model",
        responder: Callable[[str, dict[str, Any]], tuple[int, Any] | None] | None = None,
    ) -> None:
        self.slot_count = slots
        self._slots = threading.Semaphore(slots)
        self.ms_per_token = ms_per_token
        self.context_chars = context_chars
        self.model_id = model_id
        self.responder = responder
        self.health_status = 200
        self.lock = threading.Lock()
        self.served: list[ServedRequest] = []
        # Requests that took a slot, including those still holding it.
        self.slots_taken = 0
        self._server = _Server(self._handler())

    @property
    def url(self) -> str:
        return self._server.url

    def start(self) -> FakeEngine:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def reset(self) -> None:
        with self.lock:
            self.served.clear()

    def busy_intervals(self) -> list[tuple[float, float]]:
        with self.lock:
            return [
                (request.slot_start, request.slot_end)
                for request in self.served
                if request.slot_start is not None and request.slot_end is not None
            ]

    def complete(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        if self.responder is not None:
            answer = self.responder(path, body)
            if answer is not None:
                self._record(ServedRequest(path, body, answer[0], None, None))
                return answer
        prompt = _prompt_text(body)
        if len(prompt) > self.context_chars:
            self._record(ServedRequest(path, body, 400, None, None))
            return 400, {
                "error": {
                    "code": 400,
                    "type": "exceed_context_size_error",
                    "message": "the request exceeds the available context size, try increasing it",
                    "n_ctx": self.context_chars,
                }
            }
        tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        with self._slots:
            start = time.monotonic()
            with self.lock:
                self.slots_taken += 1
            time.sleep(tokens * self.ms_per_token / 1000.0)
            end = time.monotonic()
        self._record(ServedRequest(path, body, 200, start, end))
        return 200, _completion(path, prompt, tokens, self.model_id)

    def _record(self, request: ServedRequest) -> None:
        with self.lock:
            self.served.append(request)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        engine = self

        class Handler(_JsonHandler):
            def do_GET(self) -> None:
                if self.path == "/health":
                    status = engine.health_status
                    self.send_json(status, {"status": "ok" if status == 200 else "loading"})
                elif self.path == "/v1/models":
                    self.send_json(200, {"object": "list", "data": [{"id": engine.model_id}]})
                else:
                    self.send_json(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                try:
                    body = self.read_json()
                except ValueError:
                    self.send_json(400, {"error": {"message": "body is not JSON"}})
                    return
                if self.path not in ("/v1/chat/completions", "/v1/completions"):
                    self.send_json(404, {"error": {"message": f"no route {self.path}"}})
                    return
                status, payload = engine.complete(self.path, body)
                self.send_json(status, payload)

        return Handler


def _prompt_text(body: dict[str, Any]) -> str:
    if "messages" in body:
        parts = []
        for message in body.get("messages") or []:
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
        return " ".join(parts)
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


def _completion(path: str, prompt: str, tokens: int, model_id: str) -> dict[str, Any]:
    text = ("ok " * tokens).strip()
    if path.endswith("/chat/completions"):
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "length",
        }
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": "length"}
        kind = "text_completion"
    prompt_tokens = max(1, len(prompt) // 4)
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:12]}",
        "object": kind,
        "created": int(time.time()),
        "model": model_id,
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": tokens,
            "total_tokens": prompt_tokens + tokens,
        },
    }
