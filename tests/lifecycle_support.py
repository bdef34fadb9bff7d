"""An in-process AWS account where the state machines run: moto's Step Functions interpreter
executes them and their Lambda tasks run the app's handlers (``tandemn/lambda_bridge.py``).

Replicas are launched by ``RecordingProvider``, which records every launch (with the replica's
token, so a test can act as the replica) and every termination, and reports no capacity for the
placements a test lists.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from chalice.test import Client
from moto import mock_aws

from chalicelib import aws as aws_clients
from chalicelib import providers, replicas
from chalicelib.config import load_settings
from tandemn import lambda_bridge, statemachines
from tandemn.resources import create_resources
from tests import support

PROJECT_DIR = Path(__file__).resolve().parent.parent
MOTO_CONFIG: dict[str, Any] = {}
lambda_bridge.enable_execution(MOTO_CONFIG)


@dataclass
class Launch:
    job_id: str
    replica_id: str
    token: str
    config: dict[str, Any]
    at: float


@dataclass
class RecordingProvider:
    name: str = "recording"
    # (gpu_type, market) pairs whose launch raises InsufficientInstanceCapacity.
    unavailable: set[tuple[str | None, str | None]] = field(default_factory=set)
    launches: list[Launch] = field(default_factory=list)
    terminations: list[tuple[str, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def launch(self, job_id: str, replica_id: str, token: str, config: dict[str, Any]) -> dict:
        key = (config.get("gpu_type"), config.get("market"))
        if key in self.unavailable:
            raise providers.CapacityUnavailable(
                "InsufficientInstanceCapacity", f"no capacity for {key[0]} {key[1]}"
            )
        with self.lock:
            self.launches.append(Launch(job_id, replica_id, token, dict(config), time.time()))
            number = len(self.launches)
        return {"instance_id": f"i-{number:08d}", "instance_type": f"{key[0]}-box"}

    def terminate(self, job_id: str, replica_id: str) -> None:
        with self.lock:
            self.terminations.append((replica_id, time.time()))

    def launches_of(self, replica_id: str) -> list[Launch]:
        with self.lock:
            return [launch for launch in self.launches if launch.replica_id == replica_id]

    def terminated(self, replica_id: str) -> list[float]:
        with self.lock:
            return [at for rid, at in self.terminations if rid == replica_id]


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, message: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {message or condition}")


@dataclass
class Stack:
    settings: Any
    provider: RecordingProvider
    client: Client
    machines: dict[str, str]

    def replica(self, job_id: str, replica_id: str) -> dict[str, Any]:
        found = replicas.get_replica(self.settings, job_id, replica_id)
        assert found is not None, f"replica {replica_id} not found"
        return found

    def token(self, replica_id: str) -> str:
        launches = wait_for(
            lambda: self.provider.launches_of(replica_id), message=f"launch of {replica_id}"
        )
        return launches[-1].token

    def wait_phase(self, job_id: str, replica_id: str, *phases: str, timeout: float = 20.0):
        return wait_for(
            lambda: (
                self.replica(job_id, replica_id)["phase"] in phases
                and self.replica(job_id, replica_id)
            ),
            timeout,
            f"{replica_id} in {phases}",
        )

    def report_ready(self, job_id: str, replica_id: str) -> str:
        """Acts as the replica: waits for its launch wait, then reports model_ready."""
        token = self.token(replica_id)
        wait_for(
            lambda: self.replica(job_id, replica_id).get("launch_task_token"),
            message=f"launch wait of {replica_id}",
        )
        response = support.post(
            self.client,
            f"/job/{job_id}/phase",
            {"phase": "model_ready", "replica_id": replica_id},
            token,
        )
        assert response.status_code == 200, response.body
        return token

    def executions(self, kind: str) -> list[dict[str, Any]]:
        sfn = aws_clients.client("stepfunctions")
        return sfn.list_executions(stateMachineArn=self.machines[kind])["executions"]

    def execution(self, kind: str, name: str) -> dict[str, Any] | None:
        arn = self.machines[kind].replace(":stateMachine:", ":execution:") + f":{name}"
        sfn = aws_clients.client("stepfunctions")
        try:
            return sfn.describe_execution(executionArn=arn)
        except sfn.exceptions.ExecutionDoesNotExist:
            return None

    def wait_execution(self, kind: str, name: str, timeout: float = 20.0) -> dict[str, Any]:
        def ended() -> dict[str, Any] | None:
            found = self.execution(kind, name)
            return found if found and found["status"] != "RUNNING" else None

        return wait_for(ended, timeout, f"execution {name} to end")


@pytest.fixture
def lifecycle_stack(monkeypatch):
    monkeypatch.setenv("TANDEMN_PROVIDER", "recording")
    monkeypatch.setenv("TANDEMN_READY_TIMEOUT_SECONDS", "60")
    monkeypatch.setenv("TANDEMN_READY_HEARTBEAT_SECONDS", "60")
    monkeypatch.setenv("TANDEMN_SWAP_POLL_SECONDS", "1")
    monkeypatch.setenv("TANDEMN_DRAIN_SECONDS", "1")
    with mock_aws(config=MOTO_CONFIG):
        aws_clients.reset_clients()
        replicas.clear_auth_cache()
        settings = load_settings()
        create_resources(aws_clients.client("dynamodb"), aws_clients.client("s3"), settings)
        from app import app

        bridge = lambda_bridge.install_in_process(app.handler_map)
        machines = statemachines.create_local_state_machines(
            aws_clients.client("stepfunctions"), settings.region
        )
        for kind, arn in machines.items():
            monkeypatch.setenv(f"TANDEMN_{kind.upper()}_STATE_MACHINE", arn)
        provider = RecordingProvider()
        providers.register(provider)
        try:
            with Client(app, stage_name="test", project_dir=str(PROJECT_DIR)) as client:
                yield Stack(settings, provider, client, machines)
        finally:
            # Nothing may run once the mock ends: an unmocked client would call AWS itself.
            stop_executions(machines)
            bridge.close()
            providers.unregister(provider.name)
    aws_clients.reset_clients()
    replicas.clear_auth_cache()


def stop_executions(machines: dict[str, str]) -> None:
    sfn = aws_clients.client("stepfunctions")
    for arn in machines.values():
        for execution in sfn.list_executions(stateMachineArn=arn, statusFilter="RUNNING")[
            "executions"
        ]:
            sfn.stop_execution(executionArn=execution["executionArn"], error="TestEnded")


def submit(stack: Stack, num_requests: int, chunk_size: int, **options: Any) -> dict[str, Any]:
    return support.submit_job(
        stack.client, stack.settings, num_requests, chunk_size, gpu_type="L4", **options
    )


def history_errors(stack: Stack, kind: str, name: str) -> list[str]:
    arn = stack.machines[kind].replace(":stateMachine:", ":execution:") + f":{name}"
    events = aws_clients.client("stepfunctions").get_execution_history(executionArn=arn)["events"]
    found = []
    for event in events:
        for key, value in event.items():
            if key.endswith("EventDetails") and isinstance(value, dict) and "error" in value:
                found.append(value["error"])
    return found


def dump(value: Any) -> str:
    return json.dumps(value, default=str, indent=1)
