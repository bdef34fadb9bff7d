"""The local provider: each replica is a llama.cpp ``llama-server`` process plus a sidecar process.

The engine and the sidecar talk over 127.0.0.1 exactly as vLLM and the sidecar do on a GPU
instance. The replica token reaches the sidecar through its environment, never its argv (argv is
readable by every user through ``ps``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class EngineSettings:
    """How each local replica's engine runs."""

    # Path of the llama-server binary, or None for a simulated engine (tests, benchmarks).
    server_binary: Path | None
    model_path: Path | None
    # llama.cpp splits --ctx-size evenly across --parallel slots.
    slots: int = 4
    context_per_slot: int = 2048
    # CPU threads per engine. llama.cpp defaults to one per core, so two engines on two cores
    # would each spin on both; half the cores each suits the usual 2 replicas.
    threads: int = field(default_factory=lambda: max(1, (os.cpu_count() or 2) // 2))
    extra_arguments: list[str] = field(default_factory=list)


@dataclass
class LocalReplica:
    job_id: str
    replica_id: str
    engine: subprocess.Popen
    sidecar: subprocess.Popen
    engine_port: int


class LocalProvider:
    name = "local"

    def __init__(self, api_url: str, engine: EngineSettings, log_dir: Path) -> None:
        self.api_url = api_url
        self.engine = engine
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._replicas: dict[str, LocalReplica] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="local-provider", daemon=True)
        self._monitor.start()

    def _engine_command(self, port: int, model_name: str | None) -> list[str]:
        if self.engine.server_binary is None:
            return [
                sys.executable,
                "-m",
                "tandemn.fake_engine",
                "--port",
                str(port),
                "--slots",
                str(self.engine.slots),
            ]
        return [
            str(self.engine.server_binary),
            "-m",
            str(self.engine.model_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--parallel",
            str(self.engine.slots),
            "--ctx-size",
            str(self.engine.slots * self.engine.context_per_slot),
            "--threads", str(self.engine.threads),
            "--metrics",
            "--no-webui",
            # Without an alias llama-server names the model by its file path, and every output
            # record would carry that path as its "model" in place of the job's model name.
            *(["--alias", model_name] if model_name else []),
            *self.engine.extra_arguments,
        ]

    def launch(
        self, job_id: str, replica_id: str, token: str, config: dict[str, Any]
    ) -> dict[str, Any]:
        # A relaunch of the same replica (its next placement candidate) replaces the old one.
        self.terminate(job_id, replica_id)
        port = free_port()
        engine_path = self.log_dir / f"{replica_id}.engine.log"
        sidecar_path = self.log_dir / f"{replica_id}.sidecar.log"
        # The children write to their own copies of the file descriptors, so the parent's
        # copies close once both processes have started.
        with open(engine_path, "ab") as engine_log, open(sidecar_path, "ab") as sidecar_log:
            engine = subprocess.Popen(
                self._engine_command(port, config.get("model_name")),
                stdout=engine_log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            environment = {
                **os.environ,
                "TANDEMN_REPLICA_TOKEN": token,
                "PYTHONUNBUFFERED": "1",
            }
            sidecar = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sidecar",
                    "--api-url",
                    self.api_url,
                    "--job-id",
                    job_id,
                    "--replica-id",
                    replica_id,
                    "--engine-url",
                    f"http://127.0.0.1:{port}",
                    "--concurrency",
                    str(self.engine.slots),
                ],
                stdout=sidecar_log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=environment,
                start_new_session=True,
            )
        with self._lock:
            self._replicas[replica_id] = LocalReplica(job_id, replica_id, engine, sidecar, port)
        logger.info(
            "local replica started",
            extra={
                "job_id": job_id,
                "replica_id": replica_id,
                "engine_pid": engine.pid,
                "sidecar_pid": sidecar.pid,
                "engine_port": port,
            },
        )
        return {"instance_id": f"local-{sidecar.pid}", "instance_type": "local"}

    def terminate(self, job_id: str, replica_id: str) -> None:
        """Stops a replica at once (a kill): SIGKILL to both processes."""
        with self._lock:
            replica = self._replicas.pop(replica_id, None)
        if replica is None:
            return
        for process in (replica.sidecar, replica.engine):
            _signal(process, signal.SIGKILL)
            _reap(process, 5)
        logger.info("local replica killed", extra={"job_id": job_id, "replica_id": replica_id})

    def processes(self, replica_id: str) -> LocalReplica | None:
        with self._lock:
            return self._replicas.get(replica_id)

    def replica_ids(self) -> list[str]:
        with self._lock:
            return list(self._replicas)

    def _watch(self) -> None:
        # A sidecar that exits (finished, crashed or killed) leaves its engine without work.
        while not self._stopping.wait(1.0):
            with self._lock:
                finished = [r for r in self._replicas.values() if r.sidecar.poll() is not None]
                for replica in finished:
                    self._replicas.pop(replica.replica_id, None)
            for replica in finished:
                _signal(replica.engine, signal.SIGTERM)
                _reap(replica.engine, 10)
                logger.info(
                    "local replica exited",
                    extra={
                        "job_id": replica.job_id,
                        "replica_id": replica.replica_id,
                        "sidecar_exit_code": replica.sidecar.returncode,
                    },
                )

    def stop_all(self, drain_seconds: float = 10.0) -> None:
        """Drains every replica (SIGTERM to the sidecar), then stops what is left."""
        self._stopping.set()
        with self._lock:
            replicas = list(self._replicas.values())
            self._replicas.clear()
        for replica in replicas:
            _signal(replica.sidecar, signal.SIGTERM)
        deadline = time.monotonic() + drain_seconds
        for replica in replicas:
            _reap(replica.sidecar, max(0.1, deadline - time.monotonic()))
        for replica in replicas:
            for process in (replica.sidecar, replica.engine):
                if process.poll() is None:
                    _signal(process, signal.SIGTERM)
            for process in (replica.sidecar, replica.engine):
                _reap(process, 5)


def _signal(process: subprocess.Popen, number: int) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, number)
    except ProcessLookupError:
        pass


def _reap(process: subprocess.Popen, timeout: float) -> None:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal(process, signal.SIGKILL)
        process.wait(timeout=5)
