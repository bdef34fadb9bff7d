"""``POST /job/{id}/cancel`` against an in-process moto account."""

from __future__ import annotations

import pytest

from chalicelib import aws, chunks, dynamo
from tests import support
from tests.lifecycle_support import submit as submit_launched


def _submit(client, aws_account, num_requests: int = 6, chunk_size: int = 2) -> str:
    return support.submit_job(client, aws_account, num_requests, chunk_size)["job_id"]


def _set_status(settings, job_id: str, status: str) -> None:
    aws.client("dynamodb").update_item(
        TableName=settings.jobs_table,
        Key={"job_id": {"S": job_id}},
        UpdateExpression="SET #status = :status",
        ExpressionAttributeNames={"#status": "status"},
        ExpressionAttributeValues=dynamo.serialize({":status": status}),
    )


def _cancel(client, job_id: str, body: dict | None = None):
    return support.post(client, f"/job/{job_id}/cancel", body or {})


def test_cancel_unknown_job_is_404(client, aws_account):
    response = _cancel(client, "no-such-job")
    assert response.status_code == 404
    assert "no-such-job" in response.json_body["message"]


def test_cancel_invalid_job_id_is_400(client, aws_account):
    response = _cancel(client, "Bad_Id")
    assert response.status_code == 400
    assert "job_id" in response.json_body["message"]


def test_cancel_unknown_field_is_400(client, aws_account):
    job_id = _submit(client, aws_account)
    response = _cancel(client, job_id, {"force": True})
    assert response.status_code == 400
    assert "unknown field 'force'" in response.json_body["message"]


def test_cancel_stops_work_and_keeps_outputs(client, aws_account):
    settings = aws_account
    job_id = _submit(client, aws_account, 6, 2)
    tokens = support.add_replicas(client, job_id, 2)
    first, second = sorted(tokens)
    done = support.pull(client, job_id, first, tokens[first]).json_body
    support.write_output(settings, done)
    assert support.complete(client, job_id, first, tokens[first], done).status_code == 200
    assert support.pull(client, job_id, second, tokens[second]).status_code == 200

    response = _cancel(client, job_id, {"reason": "wrong model"})
    assert response.status_code == 200, response.body
    body = response.json_body
    assert body["status"] == "cancelled"
    assert body["previous_status"] == "queued"
    assert body["already_cancelled"] is False
    assert body["cancel_reason"] == "wrong model"
    assert sorted(body["stopped_replicas"]) == [first, second]
    assert body["chunks"]["completed"] == 1
    assert body["chunks"]["inflight"] == 0
    assert body["chunks"]["pending"] == 2
    assert body["chunk_outputs"] == f"s3://{settings.bucket}/jobs/{job_id}/chunks/"

    view = support.get(client, f"/job/{job_id}").json_body
    assert view["status"] == "cancelled"
    assert view["cancel_reason"] == "wrong model"
    replicas = support.get(client, f"/job/{job_id}/replicas").json_body["replicas"]
    assert {r["phase"] for r in replicas} == {"killed"}
    # The held chunk went back without spending a retry.
    assert chunks.get_chunk(settings, job_id, 1)["failures"] == 0
    # The completed chunk's output is kept where the attempt wrote it.
    kept = support.read_jsonl(settings.bucket, done["output_key"])
    assert len(kept) == 2

    # The teardown assembles the completed requests, and a cancelled record for each of the rest.
    links = support.get(client, f"/job/{job_id}/output")
    assert links.status_code == 200, links.body
    output = support.read_jsonl(settings.bucket, f"jobs/{job_id}/output.jsonl")
    assert [r["custom_id"] for r in output] == [r["custom_id"] for r in kept]
    cancelled = support.read_jsonl(settings.bucket, f"jobs/{job_id}/errors.jsonl")
    assert [r["error"]["code"] for r in cancelled] == ["batch_cancelled"] * 4
    every_id = sorted(r["custom_id"] for r in output + cancelled)
    assert every_id == [f"req-{i:05d}" for i in range(6)]
    view = support.get(client, f"/job/{job_id}").json_body
    assert view["status"] == "cancelled"
    assert view["requests_succeeded"] == 2
    assert view["requests_failed"] == 0
    assert view["requests_cancelled"] == 4
    run = support.get(client, f"/analytics/runs/{job_id}").json_body["run"]
    assert run["requests"] == {"total": 6, "succeeded": 2, "failed": 0, "cancelled": 4}


def test_failed_partial_output_still_ends_teardown(client, aws_account, monkeypatch):
    from chalicelib import assembly

    def broken(*args, **kwargs):
        raise RuntimeError("S3 unavailable")

    monkeypatch.setattr(assembly, "assemble_cancelled", broken)
    job_id = _submit(client, aws_account, 6, 2)
    assert _cancel(client, job_id).status_code == 200
    # The teardown went on to write the run report, and the output is simply not there.
    run = support.get(client, f"/analytics/runs/{job_id}")
    assert run.status_code == 200
    assert run.json_body["run"]["status"] == "cancelled"
    assert support.get(client, f"/job/{job_id}/output").status_code == 409


def test_cancelled_job_hands_out_no_work(client, aws_account):
    settings = aws_account
    job_id = _submit(client, aws_account, 6, 2)
    tokens = support.add_replicas(client, job_id, 1)
    (replica_id,) = tokens
    held = support.pull(client, job_id, replica_id, tokens[replica_id]).json_body
    support.write_output(settings, held)
    assert _cancel(client, job_id).status_code == 200

    pulled = support.pull(client, job_id, replica_id, tokens[replica_id])
    assert pulled.status_code == 204
    beat = support.post(
        client, f"/job/{job_id}/heartbeat", {"replica_id": replica_id}, tokens[replica_id]
    )
    assert beat.status_code == 200
    assert beat.json_body["action"] == "drain"
    progress = support.get(client, f"/job/{job_id}/chunks/progress", tokens[replica_id])
    assert progress.json_body["job_status"] == "cancelled"
    renewed = support.post(
        client,
        f"/job/{job_id}/chunks/renew",
        {
            "replica_id": replica_id,
            "chunk_id": held["chunk_id"],
            "lease_token": held["lease_token"],
        },
        tokens[replica_id],
    )
    assert renewed.status_code == 409
    assert renewed.json_body["code"] == "lease_lost"
    late = support.complete(client, job_id, replica_id, tokens[replica_id], held)
    assert late.status_code == 409
    assert "cancelled" in late.json_body["message"]


def test_cancel_twice_is_idempotent(client, aws_account):
    job_id = _submit(client, aws_account)
    assert _cancel(client, job_id).status_code == 200
    again = _cancel(client, job_id)
    assert again.status_code == 200, again.body
    assert again.json_body["status"] == "cancelled"
    assert again.json_body["already_cancelled"] is True
    assert again.json_body["previous_status"] == "cancelled"
    assert again.json_body["stopped_replicas"] == []


def test_cancel_during_background_validation_launches_nothing(client, aws_account, monkeypatch):
    from chalicelib import background, submission

    queued_tasks = []
    monkeypatch.setattr(background, "submit", lambda name, payload: queued_tasks.append(name))
    monkeypatch.setenv("TANDEMN_SYNC_VALIDATION_MAX_BYTES", "10")
    job_id = _submit(client, aws_account)
    assert queued_tasks == ["validate"]

    response = _cancel(client, job_id)
    assert response.status_code == 200, response.body
    assert response.json_body["previous_status"] == "validating"
    submission.validate_in_background(aws_account, job_id)
    assert support.get(client, f"/job/{job_id}").json_body["status"] == "cancelled"
    assert support.get(client, f"/job/{job_id}/replicas").json_body["replicas"] == []


def test_cancel_removes_job_from_active_index(client, aws_account):
    from chalicelib import jobs

    job_id = _submit(client, aws_account)
    assert job_id in jobs.list_active_job_ids(aws_account)
    assert _cancel(client, job_id).status_code == 200
    assert job_id not in jobs.list_active_job_ids(aws_account)


@pytest.mark.parametrize("status", ["succeeded", "completed_with_errors", "failed"])
def test_cancel_finished_job_is_409(client, aws_account, status):
    job_id = _submit(client, aws_account)
    _set_status(aws_account, job_id, status)
    response = _cancel(client, job_id)
    assert response.status_code == 409
    body = response.json_body
    assert f"already ended as '{status}'" in body["message"]
    assert body["job_status"] == status


def test_cancel_assembling_job_is_409(client, aws_account):
    job_id = _submit(client, aws_account)
    _set_status(aws_account, job_id, "assembling")
    response = _cancel(client, job_id)
    assert response.status_code == 409
    assert "assembling" in response.json_body["message"]


def test_cancel_writes_run_report(client, aws_account):
    job_id = _submit(client, aws_account)
    assert _cancel(client, job_id).status_code == 200
    run = support.get(client, f"/analytics/runs/{job_id}")
    assert run.status_code == 200, run.body
    assert run.json_body["run"]["status"] == "cancelled"


def test_cancel_terminates_launched_replicas(lifecycle_stack):
    stack = lifecycle_stack
    job = submit_launched(stack, 6, 2, replicas=2)
    job_id = job["job_id"]
    first, second = f"{job_id}-r0", f"{job_id}-r1"
    stack.report_ready(job_id, first)

    response = support.post(stack.client, f"/job/{job_id}/cancel", {})
    assert response.status_code == 200, response.body
    assert sorted(response.json_body["stopped_replicas"]) == [first, second]
    assert stack.provider.terminated(first)
    assert stack.provider.terminated(second)
    # The replica still starting ends its launch execution instead of waiting for a timeout.
    assert stack.wait_execution("launch", f"{second}-launch")["status"] == "SUCCEEDED"
    assert stack.wait_execution("teardown", f"{job_id}-teardown")["status"] == "SUCCEEDED"
    assert stack.replica(job_id, first)["phase"] == "killed"
    assert support.get(stack.client, f"/job/{job_id}").json_body["status"] == "cancelled"
