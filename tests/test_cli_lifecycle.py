"""``tandemn deploy --local``, ``add``, ``kill`` and ``swap`` against the local stack, whose
replicas (simulated engines) launch through the same state machines as on AWS."""

from __future__ import annotations

import json
import time

import boto3
import pytest
from typer.testing import CliRunner

from tandemn.api_client import ApiClient
from tandemn.cli import app
from tests import support
from tests.localstack_support import (
    PROJECT_DIR,
    StackProcess,
    processes_with_argument,
    wait_for_job,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def stack():
    process = StackProcess(
        "--engine",
        "fake",
        "--watchdog-seconds",
        "1",
        "--lease-seconds",
        "10",
        log_path=PROJECT_DIR / "test-artifacts" / "lifecycle-stack.log",
    )
    try:
        process.wait_ready()
        yield process
    finally:
        assert process.stop() == 0


def invoke(stack, *arguments: str):
    return runner.invoke(
        app, [*arguments], env={"TANDEMN_API_URL": stack.url}, catch_exceptions=False
    )


def moto(stack, service: str):
    """A client of the stack's moto server on 127.0.0.1, with the local stage's credentials."""
    return boto3.client(
        service,
        endpoint_url=f"http://127.0.0.1:{stack.port + 1}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def replica_phases(stack, job_id: str) -> dict[str, str]:
    replicas = ApiClient(stack.url).get(f"/job/{job_id}/replicas")["replicas"]
    return {r["replica_id"]: r["phase"] for r in replicas}


def wait_phase(stack, job_id: str, replica_id: str, phases: tuple[str, ...], timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        phase = replica_phases(stack, job_id).get(replica_id)
        if phase in phases:
            return phase
        time.sleep(0.3)
    raise AssertionError(f"{replica_id} never reached {phases}: {replica_phases(stack, job_id)}")


def write_input(path, count: int, max_tokens: int) -> list[str]:
    ids = [f"life-{i:03d}" for i in range(count)]
    path.write_bytes(support.jsonl([support.request_line(i, max_tokens=max_tokens) for i in ids]))
    return ids


def execution_status(stack, kind: str, name: str) -> str:
    sfn = moto(stack, "stepfunctions")
    machines = {m["name"]: m["stateMachineArn"] for m in sfn.list_state_machines()["stateMachines"]}
    arn = machines[f"tandemn-{kind}"].replace(":stateMachine:", ":execution:") + f":{name}"
    return sfn.describe_execution(executionArn=arn)["status"]


def test_deploy_local_launches_through_state_machines(stack, tmp_path):
    ids = write_input(tmp_path / "in.jsonl", 6, max_tokens=10)
    result = runner.invoke(
        app,
        [
            "deploy",
            "fake/model",
            str(tmp_path / "in.jsonl"),
            "--local",
            "--chunk-size",
            "2",
            "--json",
        ],
        env={"TANDEMN_API_URL": "http://127.0.0.1:9", "TANDEMN_LOCAL_STATE_DIR": stack.state_dir},
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    job_id = json.loads(result.output)["job_id"]

    job = wait_for_job(ApiClient(stack.url), job_id, timeout=60)
    assert job["status"] == "succeeded"
    assert job["requests_succeeded"] == len(ids)
    assert execution_status(stack, "scale", f"{job_id}-v1-scale") == "SUCCEEDED"
    assert execution_status(stack, "launch", f"{job_id}-r0-launch") == "SUCCEEDED"

    deadline = time.monotonic() + 30
    while execution_status(stack, "teardown", f"{job_id}-teardown") == "RUNNING":
        assert time.monotonic() < deadline, "teardown did not end"
        time.sleep(0.3)
    assert execution_status(stack, "teardown", f"{job_id}-teardown") == "SUCCEEDED"
    item = moto(stack, "dynamodb").get_item(
        TableName="tandemn-replicas",
        Key={"job_id": {"S": job_id}, "replica_id": {"S": f"{job_id}-r0"}},
    )["Item"]
    assert item["phase"]["S"] == "completed"
    assert item["instance_id"]["S"].startswith("local-")
    assert int(item["chunks_completed"]["N"]) == 3


def test_kill_of_last_replica_warns(stack, tmp_path):
    write_input(tmp_path / "in.jsonl", 20, max_tokens=1500)
    uri = ApiClient(stack.url).upload(tmp_path / "in.jsonl")
    submitted = ApiClient(stack.url).post(
        "/submit/batch",
        {"model_name": "fake/model", "input_file": uri, "replicas": 1, "chunk_size": 2},
    )
    job_id = submitted["job_id"]
    only = f"{job_id}-r0"
    wait_phase(stack, job_id, only, ("running",))

    killed = invoke(stack, "kill", job_id, only)
    assert killed.exit_code == 0, killed.output
    assert "no working replica left" in killed.output
    assert f"tandemn add {job_id}" in killed.output
    assert invoke(stack, "destroy", job_id).exit_code == 0


def test_add_kill_and_swap(stack, tmp_path):
    # 30 chunks of 3 s each: the job outlasts the swap's drain of 10 s.
    ids = write_input(tmp_path / "in.jsonl", 60, max_tokens=1500)
    uri = ApiClient(stack.url).upload(tmp_path / "in.jsonl")
    submitted = ApiClient(stack.url).post(
        "/submit/batch",
        {"model_name": "fake/model", "input_file": uri, "replicas": 1, "chunk_size": 2},
    )
    job_id = submitted["job_id"]
    first = f"{job_id}-r0"
    wait_phase(stack, job_id, first, ("running",))

    added = invoke(stack, "add", job_id, "--count", "1", "--json")
    assert added.exit_code == 0, added.output
    body = json.loads(added.output)
    extra = f"{job_id}-v2-r0"
    assert body["new_replicas"] == [extra]
    assert body["version"] == 2
    wait_phase(stack, job_id, extra, ("model_ready", "running"))
    assert processes_with_argument(f"--replica-id {extra}")

    killed = invoke(stack, "kill", job_id, extra)
    assert killed.exit_code == 0, killed.output
    assert f"killed {extra}" in killed.output
    assert "no working replica" not in killed.output
    assert replica_phases(stack, job_id)[extra] == "killed"
    assert processes_with_argument(f"--replica-id {extra}") == []

    swapped = invoke(
        stack, "swap", job_id, "--replicas", "1", "--ready-threshold", "1", "--force", "--json"
    )
    assert swapped.exit_code == 0, swapped.output
    swap = json.loads(swapped.output)
    new = f"{job_id}-v3-r0"
    assert swap["old_replicas"] == [first]
    assert swap["new_replicas"] == [new]
    again = invoke(stack, "swap", job_id, "--force")
    assert again.exit_code == 1
    assert "already" in again.output

    wait_phase(stack, job_id, first, ("swapped_out",), timeout=90)
    assert processes_with_argument(f"--replica-id {first}") == []
    job = wait_for_job(ApiClient(stack.url), job_id, timeout=180)
    assert job["status"] == "succeeded", job
    output = [
        json.loads(line)
        for line in moto(stack, "s3")
        .get_object(Bucket="tandemn-local", Key=f"jobs/{job_id}/output.jsonl")["Body"]
        .read()
        .splitlines()
    ]
    assert [record["custom_id"] for record in output] == ids


def test_swap_cancel_keeps_old_replicas(stack, tmp_path):
    write_input(tmp_path / "in.jsonl", 16, max_tokens=1500)
    uri = ApiClient(stack.url).upload(tmp_path / "in.jsonl")
    submitted = ApiClient(stack.url).post(
        "/submit/batch",
        {"model_name": "fake/model", "input_file": uri, "replicas": 1, "chunk_size": 2},
    )
    job_id = submitted["job_id"]
    old = f"{job_id}-r0"
    wait_phase(stack, job_id, old, ("running",))
    started = invoke(stack, "swap", job_id, "--replicas", "2", "--force", "--json")
    assert started.exit_code == 0, started.output
    new = json.loads(started.output)["new_replicas"]
    cancelled = invoke(stack, "swap", job_id, "--cancel")
    assert cancelled.exit_code == 0, cancelled.output
    assert "cancelling" in cancelled.output
    for replica_id in new:
        wait_phase(stack, job_id, replica_id, ("killed",), timeout=60)
    assert replica_phases(stack, job_id)[old] in ("running", "completed")
    job = wait_for_job(ApiClient(stack.url), job_id, timeout=180)
    assert job["status"] == "succeeded", job
