"""Heartbeats, dead replicas, deadline flags and spot interruptions."""

from __future__ import annotations

import time

from chalicelib import aws as aws_clients
from chalicelib import chunks, dynamo, jobs, replicas, watchdog
from tests import support
from tests.lifecycle_support import (
    submit,
)


def _set_replica(settings, job_id: str, replica_id: str, **fields) -> None:
    names = {f"#f{i}": name for i, name in enumerate(fields)}
    values = {f":f{i}": value for i, value in enumerate(fields.values())}
    aws_clients.client("dynamodb").update_item(
        TableName=settings.replicas_table,
        Key={"job_id": {"S": job_id}, "replica_id": {"S": replica_id}},
        UpdateExpression="SET " + ", ".join(f"#f{i} = :f{i}" for i in range(len(fields))),
        ExpressionAttributeNames=names,
        ExpressionAttributeValues=dynamo.serialize(values),
    )


def _heartbeat(client, job_id: str, replica_id: str, token: str):
    return support.post(client, f"/job/{job_id}/heartbeat", {"replica_id": replica_id}, token)


def test_heartbeat_answers_phase_and_action(client, aws_account):
    job = support.submit_job(client, aws_account, 4, 2)
    job_id = job["job_id"]
    tokens = support.add_replicas(client, job_id, 1)
    replica_id, token = next(iter(tokens.items()))
    response = _heartbeat(client, job_id, replica_id, token)
    assert response.status_code == 200, response.body
    assert response.json_body["phase"] == "registered"
    assert response.json_body["action"] == "continue"
    assert replicas.get_replica(aws_account, job_id, replica_id)["last_heartbeat"] > 0

    support.post(client, f"/job/{job_id}/kill", {"replica_ids": [replica_id]})
    after = _heartbeat(client, job_id, replica_id, token).json_body
    assert after == {**after, "phase": "killed", "action": "drain"}
    other = _heartbeat(client, job_id, "someone-else-r0", token)
    assert other.status_code == 403


def test_silent_replica_is_marked_dead_and_comes_back(client, aws_account):
    job = support.submit_job(client, aws_account, 6, 2)
    job_id = job["job_id"]
    tokens = support.add_replicas(client, job_id, 2)
    (silent, silent_token), (healthy, healthy_token) = sorted(tokens.items())
    for replica_id, token in tokens.items():
        support.post(
            client,
            f"/job/{job_id}/phase",
            {"phase": "generating", "replica_id": replica_id},
            token,
        )
    lease = support.pull(client, job_id, silent, silent_token).json_body
    assert support.pull(client, job_id, healthy, healthy_token).status_code == 200
    _set_replica(aws_account, job_id, silent, last_heartbeat=time.time() - 120)

    summary = watchdog.run_once(aws_account)
    assert summary["dead_replicas"] == [silent]
    found = replicas.get_replica(aws_account, job_id, silent)
    assert found["phase"] == "dead"
    assert found["phase_reason"].startswith("no heartbeat for 12")
    assert replicas.get_replica(aws_account, job_id, healthy)["phase"] == "running"
    chunk = chunks.get_chunk(aws_account, job_id, chunks.index_of(lease["chunk_id"]))
    assert chunk["status"] == "pending"
    # It died while working on the chunk, which may be the chunk's fault: one retry is spent.
    assert chunk["failures"] == 1
    assert watchdog.run_once(aws_account)["dead_replicas"] == []

    back = _heartbeat(client, job_id, silent, silent_token).json_body
    assert back["phase"] == "running"
    assert back["action"] == "continue"


def test_job_behind_its_deadline_is_flagged(client, aws_account):
    job = support.submit_job(client, aws_account, 8, 2, slo_deadline_hours=1.0)
    job_id = job["job_id"]
    tokens = support.add_replicas(client, job_id, 1)
    replica_id, token = next(iter(tokens.items()))
    lease = support.pull(client, job_id, replica_id, token).json_body
    support.write_output(aws_account, lease)
    support.complete(client, job_id, replica_id, token, lease)
    # One chunk in 50 minutes leaves three chunks for the last 10 minutes: late.
    aws_clients.client("dynamodb").update_item(
        TableName=aws_account.jobs_table,
        Key={"job_id": {"S": job_id}},
        UpdateExpression="SET created_at = :then",
        ExpressionAttributeValues=dynamo.serialize({":then": time.time() - 3000}),
    )
    summary = watchdog.run_once(aws_account)
    assert summary["deadline_at_risk"] == [job_id]
    stored = jobs.get_job(aws_account, job_id)
    assert stored["deadline_at_risk"] is True
    assert stored["projected_finish_at"] > stored["deadline_at"]
    # The flag is written when it changes, not on every pass.
    assert watchdog.run_once(aws_account)["deadline_at_risk"] == []

    view = support.get(client, f"/job/{job_id}").json_body
    assert view["deadline"]["at_risk"] is True
    assert view["deadline"]["projected_finish_at"] > view["deadline"]["deadline_at"]
    assert any("finishes" in w and "after its deadline" in w for w in view["warnings"])


def test_job_view_warns_without_working_replica(client, aws_account):
    job = support.submit_job(client, aws_account, 8, 2)
    job_id = job["job_id"]
    (replica_id,) = support.add_replicas(client, job_id, 1)
    assert support.get(client, f"/job/{job_id}").json_body["warnings"] == []

    support.post(client, f"/job/{job_id}/kill", {"replica_ids": [replica_id]})
    view = support.get(client, f"/job/{job_id}").json_body
    (warning,) = view["warnings"]
    assert "no replica is running or starting, so 4 chunks wait" in warning
    assert f"tandemn add {job_id}" in warning


def test_deadline_view_of_finished_jobs():
    created = 1_000_000.0
    job = {
        "status": "succeeded",
        "created_at": created,
        "requested": {"slo_deadline_hours": 1.0},
        "finished_at": created + 5400,
    }
    assert jobs.deadline_view(job) == {"deadline_at": created + 3600, "missed_by_sec": 1800.0}
    view = {
        "job_id": "j",
        "status": "succeeded",
        "chunks": {"pending": 0, "inflight": 0},
        "cost": {"num_running_replicas": 0},
        "deadline": jobs.deadline_view(job),
    }
    assert jobs.job_warnings(view) == ["finished 0.50 h after its deadline"]

    job["finished_at"] = created + 600
    assert jobs.deadline_view(job)["missed_by_sec"] == 0.0

    # A cancelled job did not finish its work, so it neither met nor missed its deadline.
    job["status"] = "cancelled"
    assert jobs.deadline_view(job) == {"deadline_at": created + 3600}


def test_deadline_view_of_overdue_running_job():
    created = 1_000_000.0
    job = {
        "status": "generating",
        "created_at": created,
        "requested": {"slo_deadline_hours": 1.0},
        "pending": 2,
        "completed": 2,
    }
    schedule = jobs.deadline_view(job, now=created + 3600 + 360)
    assert schedule["overdue_sec"] == 360.0
    assert schedule["at_risk"] is True
    view = {
        "job_id": "j",
        "status": "generating",
        "chunks": {"pending": 2, "inflight": 0},
        "cost": {"num_running_replicas": 1},
        "deadline": schedule,
    }
    assert jobs.job_warnings(view) == ["its deadline passed 0.10 h ago and it is still running"]


def _spot_event(instance_id: str) -> dict:
    return {
        "version": "0",
        "detail-type": "EC2 Spot Instance Interruption Warning",
        "source": "aws.ec2",
        "region": "us-east-1",
        "resources": [f"arn:aws:ec2:us-east-1b:instance/{instance_id}"],
        "detail": {"instance-id": instance_id, "instance-action": "terminate"},
    }


def _tagged_instance(job_id: str, replica_id: str) -> str:
    ec2 = aws_clients.client("ec2")
    response = ec2.run_instances(
        ImageId="ami-12c6146b",
        MinCount=1,
        MaxCount=1,
        InstanceType="g6.xlarge",
        InstanceMarketOptions={"MarketType": "spot"},
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": "tandemn:job-id", "Value": job_id},
                    {"Key": "tandemn:replica-id", "Value": replica_id},
                ],
            }
        ],
    )
    return response["Instances"][0]["InstanceId"]


def test_spot_interruption_preempts_and_replaces(lifecycle_stack):
    stack = lifecycle_stack
    job = submit(stack, 6, 2)
    job_id = job["job_id"]
    replica_id = f"{job_id}-r0"
    token = stack.report_ready(job_id, replica_id)
    lease = support.pull(stack.client, job_id, replica_id, token).json_body
    instance_id = _tagged_instance(job_id, replica_id)
    from app import app

    result = app.handler_map["spot_interruption"](_spot_event(instance_id), None)
    assert result["handled"] is True
    assert result["phase"] == "preempting"
    replacement = f"{job_id}-v2-r0"
    assert result["replacement"] == {"version": 2, "replica_ids": [replacement]}
    preempted = stack.replica(job_id, replica_id)
    assert preempted["phase"] == "preempting"
    assert "spot interruption notice" in preempted["phase_reason"]
    # The sidecar learns it from its next heartbeat, and drains.
    assert _heartbeat(stack.client, job_id, replica_id, token).json_body["action"] == "drain"
    stack.report_ready(job_id, replacement)
    assert stack.provider.launches_of(replacement)[0].config["gpu_type"] == "L4"
    # A second delivery of the same event changes nothing.
    again = app.handler_map["spot_interruption"](_spot_event(instance_id), None)
    assert again["handled"] is False
    # The preempted replica's lease, once expired, goes back without spending a retry.
    aws_clients.client("dynamodb").update_item(
        TableName=stack.settings.chunks_table,
        Key={"job_id": {"S": job_id}, "chunk_index": {"N": str(lease["chunk_index"])}},
        UpdateExpression="SET lease_expires_at = :past",
        ExpressionAttributeValues=dynamo.serialize({":past": time.time() - 5}),
    )
    assert chunks.reclaim_expired(stack.settings, job_id) == 1
    assert chunks.get_chunk(stack.settings, job_id, lease["chunk_index"])["failures"] == 0


def test_spot_interruption_of_unknown_instance_is_ignored(lifecycle_stack):
    from app import app

    ec2 = aws_clients.client("ec2")
    instance = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"][0]
    result = app.handler_map["spot_interruption"](_spot_event(instance["InstanceId"]), None)
    assert result == {"handled": False, "reason": "instance has no tandemn tags"}
