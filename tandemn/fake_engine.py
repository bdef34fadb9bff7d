"""A simulated OpenAI-compatible engine for tests and benchmarks that need many replicas.

It has a fixed number of slots; a request waits for a free slot and holds it for
``max_tokens * ms_per_token`` milliseconds, then answers a chat or text completion whose content
is deterministic. Prompts longer than ``--context`` characters get HTTP 400, as llama.cpp does
when a prompt exceeds the slot's context. A request with ``"stream": true`` gets server-sent
events, one token every ``ms_per_token``, and the connection is closed after the stream, as
llama.cpp's llama-server does.

Run: ``python -m tandemn.fake_engine --port 18080 --slots 4`` (listens on 127.0.0.1 only).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeEngine:
    def __init__(self, slots: int, ms_per_token: float, context_chars: int) -> None:
        self.slots = threading.BoundedSemaphore(slots)
        self.slot_count = slots
        self.ms_per_token = ms_per_token
        self.context_chars = context_chars
        self.lock = threading.Lock()
        self.running = 0
        self.completed = 0
        self.generated_tokens = 0
        self.prompt_tokens = 0

    def prompt_text(self, body: dict[str, Any]) -> str:
        if "messages" in body:
            parts = []
            for message in body.get("messages") or []:
                content = message.get("content")
                if isinstance(content, str):
                    parts.append(content)
                elif isinstance(content, list):
                    parts.extend(p.get("text", "") for p in content if isinstance(p, dict))
            return " ".join(parts)
        prompt = body.get("prompt", "")
        return prompt if isinstance(prompt, str) else " ".join(map(str, prompt))

    def complete(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        prompt = self.prompt_text(body)
        if len(prompt) > self.context_chars:
            return 400, {
                "error": {
                    "code": 400,
                    "type": "exceed_context_size_error",
                    "message": f"the request exceeds the available context size ({self.context_chars} characters)",
                }
            }
        tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        with self.slots:
            with self.lock:
                self.running += 1
            time.sleep(tokens * self.ms_per_token / 1000.0)
            with self.lock:
                self.running -= 1
                self.completed += 1
                self.generated_tokens += tokens
                self.prompt_tokens += max(1, len(prompt) // 4)
        text = ("ok " * tokens).strip()
        usage = {
            "prompt_tokens": max(1, len(prompt) // 4),
            "completion_tokens": tokens,
            "total_tokens": max(1, len(prompt) // 4) + tokens,
        }
        if path.endswith("/chat/completions"):
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "length",
            }
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": "length"}
            kind = "text_completion"
        return 200, {
            "id": f"cmpl-{uuid.uuid4().hex[:12]}",
            "object": kind,
            "created": int(time.time()),
            "model": "fake-engine",
            "choices": [choice],
            "usage": usage,
        }

    def stream(self, path: str, body: dict[str, Any]):
        """Yields the server-sent events of a streamed completion, one token at a time."""
        prompt = self.prompt_text(body)
        tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        chat = path.endswith("/chat/completions")
        header = {
            "id": f"cmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": "fake-engine",
        }
        with self.slots:
            with self.lock:
                self.running += 1
            for index in range(tokens):
                time.sleep(self.ms_per_token / 1000.0)
                text = "ok" if index == 0 else " ok"
                choice = (
                    {"index": 0, "delta": {"content": text}, "finish_reason": None}
                    if chat
                    else {"index": 0, "text": text, "finish_reason": None}
                )
                yield {**header, "choices": [choice]}
            with self.lock:
                self.running -= 1
                self.completed += 1
                self.generated_tokens += tokens
                self.prompt_tokens += max(1, len(prompt) // 4)
        if chat:
            last = {"index": 0, "delta": {}, "finish_reason": "length"}
        else:
            last = {"index": 0, "text": "", "finish_reason": "length"}
        yield {**header, "choices": [last]}
        if (body.get("stream_options") or {}).get("include_usage"):
            prompt_tokens = max(1, len(prompt) // 4)
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": tokens,
                "total_tokens": prompt_tokens + tokens,
            }
            yield {**header, "choices": [], "usage": usage}

    def metrics_text(self) -> str:
        with self.lock:
            return (
                f"llamacpp:requests_processing {self.running}\n"
                f"llamacpp:tokens_predicted_total {self.generated_tokens}\n"
                f"llamacpp:prompt_tokens_total {self.prompt_tokens}\n"
            )


def make_handler(engine: FakeEngine) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _send(self, status: int, payload: Any, content_type: str = "application/json") -> None:
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._send(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._send(
                    200, {"object": "list", "data": [{"id": "fake-engine", "object": "model"}]}
                )
            elif self.path == "/metrics":
                self._send(200, engine.metrics_text(), "text/plain; version=0.0.4")
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                self._send(400, {"error": {"message": "body is not JSON"}})
                return
            if self.path not in ("/v1/chat/completions", "/v1/completions"):
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            # A prompt over the context gets the same 400 whether or not it asked to stream.
            if body.get("stream") and len(engine.prompt_text(body)) <= engine.context_chars:
                self._stream(body)
                return
            status, payload = engine.complete(self.path, body)
            self._send(status, payload)

        def _stream(self, body: dict[str, Any]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for event in engine.stream(self.path, body):
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.close_connection = True

    return Handler


def serve(port: int, slots: int, ms_per_token: float, context_chars: int) -> ThreadingHTTPServer:
    engine = FakeEngine(slots, ms_per_token, context_chars)
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(engine))
    server.daemon_threads = True
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description="Simulated OpenAI-compatible engine")
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    parser.add_argument("--slots", type=int, default=4, help="requests served at once")
    parser.add_argument(
        "--ms-per-token", type=float, default=2.0, help="service time per output token, ms"
    )
    parser.add_argument(
        "--context", type=int, default=8000, help="longest prompt accepted, characters"
    )
    args = parser.parse_args()
    server = serve(args.port, args.slots, args.ms_per_token, args.context)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
