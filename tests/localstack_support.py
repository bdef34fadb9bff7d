"""Finds the local stack's replica processes and waits for jobs, for end-to-end tests."""

from __future__ import annotations

import time
from pathlib import Path

from tandemn.stack_process import PROJECT_DIR, StackProcess, free_port_pair

__all__ = [
    "PROJECT_DIR",
    "StackProcess",
    "free_port_pair",
    "processes_with_argument",
    "wait_for_job",
]


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
