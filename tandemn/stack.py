"""The local stack: the whole control plane on 127.0.0.1 with no AWS account.

One process supervises the parts. A moto server runs as a child process (DynamoDB requests
serialised, state machines executed), with the tables, bucket and state machines of ``infra/``.
Chalice's local server serves the app with the ``local`` stage, a timer runs the watchdog (moto
never fires schedules), and the local provider runs each replica as an engine plus a sidecar.
The state machines' Lambda tasks run in this process, through the Lambda bridge.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from tandemn import engine_paths

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_API_PORT = 26336

logger = logging.getLogger(__name__)


@dataclass
class StackOptions:
    api_port: int = DEFAULT_API_PORT
    # 0 picks the API port + 1.
    moto_port: int = 0
    watchdog_seconds: float = 10.0
    lease_seconds: int | None = None
    # None runs the simulated engine in place of llama-server.
    engine_binary: Path | None = None
    model_path: Path | None = None
    slots: int = 4
    context_per_slot: int = 2048
    # None keeps the provider's default (half the cores).
    engine_threads: int | None = None
    log_dir: Path = PROJECT_DIR / ".cache" / "local" / "logs"
    # Lifecycle timing of the local replicas, which start in seconds: a swap checks its new
    # replicas every swap_poll_seconds and gives the old ones drain_seconds to finish.
    ready_timeout_seconds: int = 300
    ready_heartbeat_seconds: int = 120
    swap_poll_seconds: int = 2
    drain_seconds: int = 10


def _wait_for_port(port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process on port {port} exited with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout:.0f} s")


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _stage_environment(stage: str) -> dict[str, str]:
    config = json.loads((PROJECT_DIR / ".chalice" / "config.json").read_text())
    environment = dict(config.get("environment_variables", {}))
    environment.update(config["stages"][stage].get("environment_variables", {}))
    return environment


class LocalStack:
    def __init__(self, options: StackOptions) -> None:
        self.options = options
        self.moto_port = options.moto_port or options.api_port + 1
        self.api_url = f"http://127.0.0.1:{options.api_port}"
        self.moto_url = f"http://127.0.0.1:{self.moto_port}"
        self._moto: subprocess.Popen | None = None
        self._server = None
        self._server_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._watchdog_thread: threading.Thread | None = None
        self.provider = None
        self._lambda_bridge = None

    def start(self) -> LocalStack:
        for port in (self.options.api_port, self.moto_port):
            if _port_in_use(port):
                raise RuntimeError(
                    f"port {port} on 127.0.0.1 is already in use; stop what listens there "
                    "(`tandemn local down`) or pick another --port"
                )
        environment = _stage_environment("local")
        environment["AWS_ENDPOINT_URL"] = self.moto_url
        environment["TANDEMN_PROVIDER"] = "local"
        environment["TANDEMN_READY_TIMEOUT_SECONDS"] = str(self.options.ready_timeout_seconds)
        environment["TANDEMN_READY_HEARTBEAT_SECONDS"] = str(self.options.ready_heartbeat_seconds)
        environment["TANDEMN_SWAP_POLL_SECONDS"] = str(self.options.swap_poll_seconds)
        environment["TANDEMN_DRAIN_SECONDS"] = str(self.options.drain_seconds)
        # Local sidecars inherit this: they learn of a swap or a kill within 5 s.
        environment["TANDEMN_HEARTBEAT_INTERVAL"] = "5"
        if self.options.lease_seconds:
            environment["TANDEMN_LEASE_SECONDS"] = str(self.options.lease_seconds)
        # llama-server serves its one model file whatever model name a job requests. The API
        # therefore rejects other names, so no job gets this model under another name.
        if self.options.engine_binary is not None:
            environment["TANDEMN_SERVED_MODELS"] = engine_paths.SERVED_MODEL_NAME
        os.environ.update(environment)
        self._environment = environment
        try:
            self._start_lambda_bridge()
            self._start_moto()
            self._create_resources()
            self._create_state_machines()
            self._start_provider()
            self._start_api()
            self._start_watchdog()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_lambda_bridge(self) -> None:
        # The moto server executes the state machines; their Lambda tasks come back here, where
        # the app and the local provider run (tandemn/lambda_bridge.py).
        from tandemn.lambda_bridge import LambdaDispatcher

        self._lambda_bridge = LambdaDispatcher(secrets.token_urlsafe(24)).start()

    def _start_moto(self) -> None:
        log_dir = self.options.log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        environment = {**os.environ, "TANDEMN_LAMBDA_BRIDGE_SECRET": self._lambda_bridge.secret}
        # The moto process writes to its own copy of the file descriptor.
        with open(log_dir / "moto.log", "ab") as log:
            self._moto = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tandemn.motoserver",
                    "--port",
                    str(self.moto_port),
                    "--lambda-url",
                    self._lambda_bridge.url,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=environment,
                start_new_session=True,
            )
        _wait_for_port(self.moto_port, 30, self._moto)

    def _create_resources(self) -> None:
        from chalicelib import aws
        from chalicelib.config import load_settings
        from tandemn.resources import create_resources

        aws.reset_clients()
        create_resources(aws.client("dynamodb"), aws.client("s3"), load_settings())

    def _create_state_machines(self) -> None:
        from chalicelib import aws
        from tandemn import statemachines

        arns = statemachines.create_local_state_machines(
            aws.client("stepfunctions"), os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
        )
        statemachines.export_machine_arns(arns, self._environment)
        statemachines.export_machine_arns(arns)

    def _start_provider(self) -> None:
        from chalicelib import providers
        from tandemn.local_provider import EngineSettings, LocalProvider

        engine = EngineSettings(
            server_binary=self.options.engine_binary,
            model_path=self.options.model_path,
            slots=self.options.slots,
            context_per_slot=self.options.context_per_slot,
        )
        if self.options.engine_threads:
            engine.threads = self.options.engine_threads
        self.provider = LocalProvider(self.api_url, engine, self.options.log_dir)
        providers.register(self.provider)

    def _start_api(self) -> None:
        from chalice.cli.factory import CLIFactory

        factory = CLIFactory(str(PROJECT_DIR), environ=os.environ)
        config = factory.create_config_obj(chalice_stage_name="local")
        app = config.chalice_app
        # Loading the app copies the stage's variables into os.environ, the fixed moto port of
        # the `local` stage included; this stack's own ports win.
        os.environ.update(self._environment)
        self._lambda_bridge.set_handlers(app.handler_map)
        self._server = factory.create_local_server(app, config, "127.0.0.1", self.options.api_port)
        self._server.server.handle_error = _log_request_error
        self._server_thread = threading.Thread(
            target=self._server.server.serve_forever, name="chalice-local", daemon=True
        )
        self._server_thread.start()
        _wait_for_port(self.options.api_port, 30)

    def _start_watchdog(self) -> None:
        from chalicelib import watchdog
        from chalicelib.config import load_settings

        def loop() -> None:
            while not self._stop.wait(self.options.watchdog_seconds):
                try:
                    watchdog.run_once(load_settings())
                except Exception:
                    logger.exception("watchdog pass failed")

        self._watchdog_thread = threading.Thread(target=loop, name="watchdog", daemon=True)
        self._watchdog_thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.provider is not None:
            self.provider.stop_all()
            from chalicelib import providers

            providers.unregister("local")
            self.provider = None
        if self._server is not None:
            self._server.server.shutdown()
            self._server.server.server_close()
            self._server = None
        if self._moto is not None:
            if self._moto.poll() is None:
                self._moto.terminate()
                try:
                    self._moto.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._moto.kill()
                    self._moto.wait(timeout=5)
            self._moto = None
        if self._lambda_bridge is not None:
            self._lambda_bridge.stop()
            self._lambda_bridge = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _log_request_error(request: Any, client_address: tuple[str, int]) -> None:
    """Logs a request that failed in the local API server as one line, or with its traceback.

    A client that closes its connection before the response is written (a dashboard tab closed
    while its event stream waits) is routine, so it gets one line instead of the server's default
    traceback on stderr.
    """
    error = sys.exc_info()[1]
    if isinstance(error, (BrokenPipeError, ConnectionResetError)):
        logger.info(
            "client closed the connection before the response was written",
            extra={"client_port": client_address[1], "error": type(error).__name__},
        )
        return
    logger.exception("local API request failed", extra={"client_port": client_address[1]})
