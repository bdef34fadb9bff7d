"""Runs the app's Lambda handlers when moto's Step Functions interpreter invokes a function.

With the config ``{"lambda": {"use_docker": False}}`` moto 5.2.5 sends every Lambda Invoke to
``LambdaSimpleBackend.invoke``, which only echoes its input. The state machines need the app's
``lifecycle_task`` handler instead, so this module replaces that method:

- ``install_in_process(handlers)``: the handler runs in the calling process (tests that use
  ``mock_aws``).
- ``install_forwarding(url, secret)``: for the local stack, whose moto server is a child process.
  The moto server posts each invocation to a ``LambdaDispatcher`` that the API process runs on
  127.0.0.1, because the handler must run where the app and the local provider live.

A handler's exception becomes a Lambda function error (``x-amz-function-error: Unhandled``) whose
``errorType`` is the exception's class name, as on AWS Lambda. The state machines catch by it.
"""

from __future__ import annotations

import http.server
import json
import logging
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from typing import Any

logger = logging.getLogger(__name__)

SECRET_HEADER = "X-Tandemn-Bridge-Secret"
# An invocation may run as long as a Lambda function may (15 minutes).
INVOKE_TIMEOUT_SECONDS = 900
Handlers = Mapping[str, Callable[[Any, Any], Any]]


def function_name_of(name_or_arn: str) -> str:
    """``arn:aws:lambda:REGION:ACCOUNT:function:NAME`` or ``NAME`` -> ``NAME``."""
    if ":function:" in name_or_arn:
        return name_or_arn.split(":function:", 1)[1].split(":", 1)[0]
    return name_or_arn


class LambdaContext:
    """The parts of the Lambda context object that handlers and Powertools read."""

    def __init__(self, function_name: str) -> None:
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.invoked_function_arn = f"arn:aws:lambda:local:000000000000:function:{function_name}"
        self.memory_limit_in_mb = 128
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{function_name}"
        self.log_stream_name = "local"
        self._deadline = time.monotonic() + INVOKE_TIMEOUT_SECONDS

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def invoke_handler(handlers: Handlers, name: str, body: Any) -> tuple[bytes, str | None]:
    """Runs handler ``name`` on the JSON ``body``; returns the payload and the function error."""
    handler = handlers.get(name)
    if handler is None:
        error = {"errorType": "ResourceNotFoundException", "errorMessage": f"no function {name}"}
        return json.dumps(error).encode(), "Unhandled"
    if isinstance(body, bytes):
        body = body.decode()
    event = json.loads(body) if body else {}
    try:
        result = handler(event, LambdaContext(name))
    except Exception as error:  # noqa: BLE001 - the state machine decides what to do with it
        logger.info(
            "lambda handler raised",
            extra={"function": name, "error_type": type(error).__name__, "error": str(error)},
        )
        failure = {"errorType": type(error).__name__, "errorMessage": str(error)}
        return json.dumps(failure).encode(), "Unhandled"
    return json.dumps(result, default=str).encode(), None


class Bridge:
    """The installed patch. ``close`` stops new invocations, waits for running ones to finish
    and restores moto's method, so no handler outlives the mock it was started in."""

    def __init__(self, invoke: Callable[[str, Any], tuple[bytes, str | None]]) -> None:
        from moto.awslambda_simple.models import LambdaSimpleBackend

        self._backend = LambdaSimpleBackend
        self._original = LambdaSimpleBackend.invoke
        self._invoke = invoke
        self._closed = False
        self._running = 0
        self._idle = threading.Condition()
        bridge = self

        def patched(self, function_name, qualifier, body, headers, response_headers):
            payload, error = bridge.call(function_name_of(function_name), body)
            if error:
                response_headers["x-amz-function-error"] = error
            return payload

        LambdaSimpleBackend.invoke = patched

    def call(self, name: str, body: Any) -> tuple[bytes, str | None]:
        with self._idle:
            if self._closed:
                failure = {"errorType": "BridgeClosed", "errorMessage": "the lambda bridge closed"}
                return json.dumps(failure).encode(), "Unhandled"
            self._running += 1
        try:
            return self._invoke(name, body)
        finally:
            with self._idle:
                self._running -= 1
                self._idle.notify_all()

    def close(self, timeout: float = 30.0) -> None:
        with self._idle:
            self._closed = True
            self._idle.wait_for(lambda: self._running == 0, timeout)
        self._backend.invoke = self._original


def install_in_process(handlers: Handlers) -> Bridge:
    """Makes moto run ``handlers`` in this process until the returned bridge is closed."""
    return Bridge(lambda name, body: invoke_handler(handlers, name, body))


def install_forwarding(url: str, secret: str) -> Bridge:
    """Makes moto post each invocation to a LambdaDispatcher at ``url`` (a 127.0.0.1 URL)."""

    def forward(name: str, body: Any) -> tuple[bytes, str | None]:
        data = body.encode() if isinstance(body, str) else (body or b"{}")
        request = urllib.request.Request(
            f"{url.rstrip('/')}/invoke/{name}",
            data=data,
            method="POST",
            headers={"Content-Type": "application/json", SECRET_HEADER: secret},
        )
        with urllib.request.urlopen(request, timeout=INVOKE_TIMEOUT_SECONDS) as response:
            answer = json.loads(response.read())
        return answer["payload"].encode(), answer.get("error")

    return Bridge(forward)


def enable_execution(config: dict[str, Any]) -> None:
    """Turns on moto's Step Functions interpreter and its Lambda backend without Docker."""
    config["stepfunctions"] = {"execute_state_machine": True}
    config["lambda"] = {"use_docker": False}


class LambdaDispatcher:
    """HTTP server on 127.0.0.1 that runs the app's handlers for a moto server process."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.handlers: dict[str, Callable[[Any, Any], Any]] = {}
        dispatcher = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if self.headers.get(SECRET_HEADER) != dispatcher.secret:
                    self.send_error(403, "missing or wrong bridge secret")
                    return
                if not self.path.startswith("/invoke/"):
                    self.send_error(404, "use POST /invoke/FUNCTION")
                    return
                name = self.path[len("/invoke/") :]
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                payload, error = invoke_handler(dispatcher.handlers, name, body)
                answer = json.dumps({"payload": payload.decode(), "error": error}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("lambda bridge: " + format, *args)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="lambda-bridge", daemon=True
        )

    def start(self) -> LambdaDispatcher:
        self._thread.start()
        return self

    def set_handlers(self, handlers: Handlers) -> None:
        self.handlers = dict(handlers)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
