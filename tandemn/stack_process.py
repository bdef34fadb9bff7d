"""Runs ``tandemn local up`` as a child process: the demo, the tests and the benchmarks use it
so the stack's own log lines go to a file instead of the caller's terminal."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tandemn.api_client import STATE_DIR_VARIABLE

PROJECT_DIR = Path(__file__).resolve().parent.parent


def free_port_pair() -> int:
    """Returns a port P such that P and P + 1 are free on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two adjacent free ports on 127.0.0.1")


class StackProcess:
    def __init__(self, *arguments: str, log_path: Path, port: int | None = None) -> None:
        self.port = port or free_port_pair()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("wb")
        environment = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        environment["PYTHONUNBUFFERED"] = "1"
        # A stack of its own records its pid and address in a folder of its own, unless the
        # caller chose one, so it never replaces or removes those of a stack the user runs.
        self._state_dir: str | None = None
        if STATE_DIR_VARIABLE not in environment:
            self._state_dir = tempfile.mkdtemp(prefix="tandemn-stack-")
            environment[STATE_DIR_VARIABLE] = self._state_dir
        # Where the stack records its pid and address: `--local` commands find it through it.
        self.state_dir = environment[STATE_DIR_VARIABLE]
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tandemn.cli",
                "local",
                "up",
                "--port",
                str(self.port),
                *arguments,
            ],
            cwd=PROJECT_DIR,
            env=environment,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"local stack exited early:\n{self.log_path.read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.url}/jobs", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(
            f"local stack not ready in {timeout} s:\n{self.log_path.read_text()[-3000:]}"
        )

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._log.close()
        if self._state_dir is not None:
            shutil.rmtree(self._state_dir, ignore_errors=True)
        return self.process.returncode
