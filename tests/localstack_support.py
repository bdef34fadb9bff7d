"""Finds the local stack's replica processes and waits for jobs, for end-to-end tests."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tandemn.engine_paths import LLAMA_SERVER
from tandemn.stack_process import PROJECT_DIR, StackProcess, free_port_pair

__all__ = [
    "PROJECT_DIR",
    "StackProcess",
    "free_port_pair",
    "llama_stack",
    "processes_with_argument",
    "wait_for_job",
]


def llama_stack(log_path: Path, *arguments: str) -> StackProcess:
    """Starts a local stack with the real llama-server, 2 slots a replica and a 1 s watchdog.

    Fails the test, instead of skipping it, when the engine has not been built.
    """
    if not LLAMA_SERVER.exists():
        pytest.fail("llama-server is not built; run `make engine` (make test builds it)")
    return StackProcess(
        "--engine", "llama", "--slots", "2", "--watchdog-seconds", "1", *arguments,
        log_path=log_path,
    )


def processes_with_argument(fragment: str) -> list[int]:
    """Returns pids whose command line contains ``fragment`` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in command:
            found.append(int(entry.name))
    return found


def wait_for_job(client, job_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/job/{job_id}")
        if job["status"] in ("succeeded", "completed_with_errors", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise TimeoutError(
        f"job {job_id} did not finish in {timeout} s: {client.get(f'/job/{job_id}')}"
    )
