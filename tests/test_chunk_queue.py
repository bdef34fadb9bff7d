"""Chunk queue behaviour through the REST routes, under an in-process moto account."""

from __future__ import annotations

import pytest

from chalicelib import aws, chunks, dynamo, replicas
from chalicelib.states import ReplicaPhase
from tests import support


class FakeClock:
    """Stands in for the ``time`` module inside the chunk queue so leases can expire at once."""

    def __init__(self) -> None:
        import time

        self._real = time
        self.offset = 0.0

    def time(self) -> float:
        return self._real.time() + self.offset

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(chunks, "time", fake)
    return fake


def chunk_items(settings, job_id):
    response = aws.client("dynamodb").query(
        TableName=settings.chunks_table,
        KeyConditionExpression="job_id = :j",
        ExpressionAttributeValues={":j": {"S": job_id}},
        ConsistentRead=True,
    )
    return [dynamo.deserialize(item) for item in response["Items"]]


def assert_counters_match_items(client, settings, job_id):
    job = support.get(client, f"/job/{job_id}").json_body
    counted = {"pending": 0, "inflight": 0, "completed": 0, "failed": 0}
    for item in chunk_items(settings, job_id):
        counted[item["status"]] += 1
    for status, count in counted.items():
        assert job["chunks"][status] == count, (status, job["chunks"], counted)
    assert job["chunks"]["total"] == sum(counted.values())
    return job["chunks"]


@pytest.fixture
def job(client, aws_account):
    submitted = support.submit_job(client, aws_account, num_requests=10, chunk_size=2)
    tokens = support.add_replicas(client, submitted["job_id"], 2)
    return submitted["job_id"], list(tokens.items())


def test_pulls_follow_input_order(client, aws_account, job):
    job_id, [(replica, token), _] = job
    seen = []
    for _ in range(5):
        response = support.pull(client, job_id, replica, token)
        assert response.status_code == 200
        seen.append(response.json_body["chunk_id"])
        assert_counters_match_items(client, aws_account, job_id)
    assert seen == ["c000000", "c000001", "c000002", "c000003", "c000004"]
    assert support.pull(client, job_id, replica, token).status_code == 204


def test_lease_byte_range_covers_its_requests(client, aws_account, job):
    job_id, [(replica, token), _] = job
    lease = support.pull(client, job_id, replica, token).json_body
    requests = support.read_range(lease)
    assert len(requests) == lease["num_lines"] == 2
    assert requests[0]["custom_id"] == "req-00000"
    assert requests[1]["custom_id"] == "req-00001"


def test_two_replicas_never_hold_same_chunk(client, aws_account, job):
    job_id, [(first, first_token), (second, second_token)] = job
    held = []
    for _ in range(5):
        for replica, token in ((first, first_token), (second, second_token)):
            response = support.pull(client, job_id, replica, token)
            if response.status_code == 200:
                held.append(response.json_body["chunk_id"])
    assert len(held) == 5
    assert len(set(held)) == 5


def test_pull_after_lease_expiry_returns_reclaimed_chunk(client, aws_account, job, clock):
    job_id, [(first, first_token), (second, second_token)] = job
    lost = support.pull(client, job_id, first, first_token).json_body
    for _ in range(4):
        assert support.pull(client, job_id, second, second_token).status_code == 200
    assert support.pull(client, job_id, second, second_token).status_code == 204

    clock.offset = aws_account.lease_seconds + 1
    again = support.pull(client, job_id, second, second_token)
    assert again.status_code == 200
    assert again.json_body["chunk_id"] == lost["chunk_id"]
    assert again.json_body["lease_token"] != lost["lease_token"]
    assert again.json_body["retry_count"] == 1
    assert again.json_body["attempt"] == 2
    assert_counters_match_items(client, aws_account, job_id)


def test_reclaimed_chunk_served_before_unpulled_ones(client, aws_account, job):
    job_id, [(first, first_token), (second, second_token)] = job
    leases = [support.pull(client, job_id, first, first_token).json_body for _ in range(2)]
    released = support.post(
        client,
        f"/job/{job_id}/chunks/release",
        {
            "replica_id": first,
            "chunk_id": leases[1]["chunk_id"],
            "lease_token": leases[1]["lease_token"],
        },
        first_token,
    )
    assert released.status_code == 200
    assert released.json_body["chunk_status"] == "pending"
    next_lease = support.pull(client, job_id, second, second_token).json_body
    assert next_lease["chunk_id"] == leases[1]["chunk_id"]
    assert next_lease["retry_count"] == 0


def test_renew_requires_current_lease_token(client, aws_account, job):
    job_id, [(replica, token), _] = job
    lease = support.pull(client, job_id, replica, token).json_body
    path = f"/job/{job_id}/chunks/renew"
    body = {
        "replica_id": replica,
        "chunk_id": lease["chunk_id"],
        "lease_token": lease["lease_token"],
    }
    ok = support.post(client, path, body, token)
    assert ok.status_code == 200
    assert ok.json_body["lease_expires_at"] >= lease["lease_expires_at"]
    wrong = support.post(client, path, {**body, "lease_token": "x" * 22}, token)
    assert wrong.status_code == 409
    assert wrong.json_body["code"] == "lease_lost"


def test_release_requires_current_lease_token(client, aws_account, job):
    job_id, [(replica, token), _] = job
    lease = support.pull(client, job_id, replica, token).json_body
    path = f"/job/{job_id}/chunks/release"
    wrong = support.post(
        client,
        path,
        {"replica_id": replica, "chunk_id": lease["chunk_id"], "lease_token": "y" * 22},
        token,
    )
    assert wrong.status_code == 409
    counters = assert_counters_match_items(client, aws_account, job_id)
    assert counters["inflight"] == 1


def test_late_completion_counts_once(client, aws_account, job, clock):
    job_id, [(first, first_token), (second, second_token)] = job
    stale = support.pull(client, job_id, first, first_token).json_body
    clock.offset = aws_account.lease_seconds + 1
    assert chunks.reclaim_expired(aws_account, job_id) == 1
    fresh = support.pull(client, job_id, second, second_token).json_body
    assert fresh["chunk_id"] == stale["chunk_id"]

    # The reclaimed attempt finishes after all: the first completion wins.
    support.write_output(aws_account, stale)
    late = support.complete(client, job_id, first, first_token, stale)
    assert late.status_code == 200
    assert late.json_body["status"] == "completed"
    assert late.json_body["completed"] == 1

    support.write_output(aws_account, fresh)
    second_completion = support.complete(client, job_id, second, second_token, fresh)
    assert second_completion.status_code == 200
    assert second_completion.json_body["status"] == "already_completed"
    assert second_completion.json_body["completed"] == 1
    counters = assert_counters_match_items(client, aws_account, job_id)
    assert counters["completed"] == 1
    assert counters["inflight"] == 0

    item = next(c for c in chunk_items(aws_account, job_id) if c["chunk_id"] == stale["chunk_id"])
    assert item["output_key"] == stale["output_key"]


def test_completion_from_reclaimed_attempt_before_repull(client, aws_account, job, clock):
    job_id, [(first, first_token), _] = job
    stale = support.pull(client, job_id, first, first_token).json_body
    clock.offset = aws_account.lease_seconds + 1
    assert aws_account and chunks.reclaim_expired(aws_account, job_id) == 1
    support.write_output(aws_account, stale)
    late = support.complete(client, job_id, first, first_token, stale)
    assert late.status_code == 200
    counters = assert_counters_match_items(client, aws_account, job_id)
    assert counters["completed"] == 1
    assert counters["pending"] == 4
    next_lease = support.pull(client, job_id, first, first_token).json_body
    assert next_lease["chunk_id"] != stale["chunk_id"]


def test_complete_rejects_token_never_issued(client, aws_account, job):
    job_id, [(replica, token), _] = job
    lease = support.pull(client, job_id, replica, token).json_body
    forged = {
        **lease,
        "lease_token": "z" * 22,
        "output_key": chunks.output_key_for(job_id, lease["chunk_id"], "z" * 22),
    }
    support.write_output(aws_account, forged)
    response = support.complete(client, job_id, replica, token, forged)
    assert response.status_code == 409
    assert assert_counters_match_items(client, aws_account, job_id)["completed"] == 0


def test_complete_requires_uploaded_output(client, aws_account, job):
    job_id, [(replica, token), _] = job
    lease = support.pull(client, job_id, replica, token).json_body
    response = support.complete(client, job_id, replica, token, lease)
    assert response.status_code == 400
    assert lease["output_key"] in response.json_body["message"]
    assert assert_counters_match_items(client, aws_account, job_id)["inflight"] == 1


def test_killed_replica_chunks_return_without_spending_retries(client, aws_account, job):
    job_id, [(first, first_token), (second, second_token)] = job
    held = [support.pull(client, job_id, first, first_token).json_body for _ in range(2)]
    response = support.post(client, f"/job/{job_id}/kill", {"replica_ids": [first]})
    assert response.status_code == 200
    assert response.json_body["killed"] == [first]
    assert response.json_body["reclaimed"] == 2
    counters = assert_counters_match_items(client, aws_account, job_id)
    assert counters["inflight"] == 0
    assert counters["pending"] == 5

    assert support.pull(client, job_id, first, first_token).status_code == 204
    again = [support.pull(client, job_id, second, second_token).json_body for _ in range(2)]
    assert sorted(a["chunk_id"] for a in again) == sorted(h["chunk_id"] for h in held)
    assert all(a["retry_count"] == 0 for a in again)


def test_kill_skips_replicas_of_other_jobs(client, aws_account, job):
    job_id, _ = job
    response = support.post(client, f"/job/{job_id}/kill", {"replica_ids": ["someone-else-v2-r0"]})
    assert response.status_code == 200
    assert response.json_body["killed"] == []
    assert response.json_body["skipped"][0]["replica_id"] == "someone-else-v2-r0"


def test_kill_invalid_replica_id_is_400(client, aws_account, job):
    job_id, _ = job
    response = support.post(client, f"/job/{job_id}/kill", {"replica_ids": ["../x"]})
    assert response.status_code == 400
    message = response.json_body["message"]
    assert 'replica_ids.0: value "../x" is not a valid id' in message
    assert "lowercase letters, digits and hyphens" in message

    emoji = support.post(client, f"/job/{job_id}/kill", {"replica_ids": ["😀"]})
    assert 'value "😀" is not a valid id' in emoji.json_body["message"]


def test_kill_retries_after_concurrent_phase_change(client, aws_account, job, monkeypatch):
    job_id, [(first, _), _] = job
    read = replicas.get_replica
    reads = []
    raced = []

    def read_then_report_ready(settings, job_id_, replica_id):
        item = read(settings, job_id_, replica_id)
        reads.append(replica_id)
        # The kill reads the replica once to check it and once inside the transition. The
        # sidecar reports its engine ready right after that second read.
        if len(reads) == 2:
            raced.append(replica_id)
            replicas.transition_replica(settings, job_id_, replica_id, ReplicaPhase.MODEL_READY)
        return item

    monkeypatch.setattr(replicas, "get_replica", read_then_report_ready)
    response = support.post(client, f"/job/{job_id}/kill", {"replica_ids": [first]})
    assert response.status_code == 200, response.json_body
    assert response.json_body["killed"] == [first]
    assert raced == [first]
    assert read(aws_account, job_id, first)["phase"] == "killed"


def test_exhausted_retry_budget_fails_chunk_with_error_records(client, aws_account, clock):
    submitted = support.submit_job(client, aws_account, num_requests=4, chunk_size=2)
    job_id = submitted["job_id"]
    ((replica, token),) = support.add_replicas(client, job_id, 1).items()
    for attempt in range(aws_account.max_chunk_failures):
        lease = support.pull(client, job_id, replica, token).json_body
        assert lease["chunk_id"] == "c000000"
        assert lease["retry_count"] == attempt
        clock.offset += aws_account.lease_seconds + 1
        chunks.reclaim_expired(aws_account, job_id)
        assert_counters_match_items(client, aws_account, job_id)
    counters = assert_counters_match_items(client, aws_account, job_id)
    assert counters["failed"] == 1
    assert counters["pending"] == 1

    last = support.pull(client, job_id, replica, token).json_body
    assert last["chunk_id"] == "c000001"
    support.write_output(aws_account, last)
    done = support.complete(client, job_id, replica, token, last)
    assert done.json_body["all_done"] is True

    job_view = support.get(client, f"/job/{job_id}").json_body
    assert job_view["status"] == "completed_with_errors"
    assert job_view["requests_succeeded"] == 2
    assert job_view["requests_failed"] == 2
    errors = support.read_jsonl(aws_account.bucket, f"jobs/{job_id}/errors.jsonl")
    assert [e["custom_id"] for e in errors] == ["req-00000", "req-00001"]
    assert errors[0]["error"]["code"] == "chunk_failed"
    assert "lease expired" in errors[0]["error"]["message"]


def test_release_with_error_spends_retry_budget(client, aws_account, job):
    job_id, [(replica, token), _] = job
    lease = support.pull(client, job_id, replica, token).json_body
    response = support.post(
        client,
        f"/job/{job_id}/chunks/release",
        {
            "replica_id": replica,
            "chunk_id": lease["chunk_id"],
            "lease_token": lease["lease_token"],
            "reason": "error",
            "error": "S3 read failed",
        },
        token,
    )
    assert response.status_code == 200
    again = support.pull(client, job_id, replica, token).json_body
    assert again["chunk_id"] == lease["chunk_id"]
    assert again["retry_count"] == 1


def test_full_run_assembles_output_in_input_order(client, aws_account, job):
    job_id, [(first, first_token), (second, second_token)] = job
    replicas_cycle = [(first, first_token), (second, second_token)]
    leases = []
    for i in range(5):
        replica, token = replicas_cycle[i % 2]
        leases.append((replica, token, support.pull(client, job_id, replica, token).json_body))
    for replica, token, lease in reversed(leases):
        support.write_output(aws_account, lease)
        response = support.complete(client, job_id, replica, token, lease)
        assert response.status_code == 200
        assert_counters_match_items(client, aws_account, job_id)
    job_view = support.get(client, f"/job/{job_id}").json_body
    assert job_view["status"] == "succeeded"
    assert job_view["progress"] == 1.0
    assert job_view["requests_succeeded"] == 10
    assert job_view["requests_failed"] == 0
    output = support.read_jsonl(aws_account.bucket, f"jobs/{job_id}/output.jsonl")
    assert [r["custom_id"] for r in output] == [f"req-{i:05d}" for i in range(10)]


def test_assembly_keeps_each_custom_id_once(client, aws_account, job):
    job_id, [(replica, token), _] = job
    for _ in range(5):
        lease = support.pull(client, job_id, replica, token).json_body
        records = None
        if lease["chunk_id"] == "c000000":
            # A buggy attempt: a duplicate, a stray id and a missing one.
            good = {"custom_id": "req-00000", "response": {"status_code": 200}, "error": None}
            stray = {"custom_id": "req-99999", "response": {"status_code": 200}, "error": None}
            records = [good, good, stray]
        support.write_output(aws_account, lease, records)
        support.complete(client, job_id, replica, token, lease)
    output = support.read_jsonl(aws_account.bucket, f"jobs/{job_id}/output.jsonl")
    errors = support.read_jsonl(aws_account.bucket, f"jobs/{job_id}/errors.jsonl")
    ids = [r["custom_id"] for r in output] + [r["custom_id"] for r in errors]
    assert sorted(ids) == [f"req-{i:05d}" for i in range(10)]
    assert errors[0]["custom_id"] == "req-00001"
    assert errors[0]["error"]["code"] == "missing_output"


def test_replica_routes_require_replica_token(client, aws_account, job):
    job_id, [(replica, token), (_, other_token)] = job
    assert support.pull(client, job_id, replica, None).status_code == 401
    assert support.pull(client, job_id, replica, "trk_" + replica + ".forged").status_code == 401
    assert support.pull(client, job_id, replica, other_token).status_code == 403
    another = support.submit_job(client, aws_account, num_requests=2, chunk_size=1)
    assert support.pull(client, another["job_id"], replica, token).status_code == 403


def test_progress_route_is_exact(client, aws_account, job):
    job_id, [(replica, token), _] = job
    support.pull(client, job_id, replica, token)
    response = support.get(client, f"/job/{job_id}/chunks/progress", token)
    assert response.status_code == 200
    assert response.json_body == {
        "total": 5,
        "pending": 4,
        "inflight": 1,
        "completed": 0,
        "failed": 0,
        "all_done": False,
        "job_status": "queued",
    }


def test_complete_with_unknown_token_is_lease_lost(client, aws_account, job):
    job_id, [(replica, token), _] = job
    lease = support.pull(client, job_id, replica, token).json_body
    forged = {**lease, "lease_token": "q" * 22, "output_key": None}
    response = support.complete(client, job_id, replica, token, forged)
    assert response.status_code == 409
    assert response.json_body["code"] == "lease_lost"


def _job_item(settings, job_id):
    from chalicelib import jobs

    return jobs.get_job(settings, job_id)


def test_abandoned_claim_is_recovered(client, aws_account, job, clock):
    job_id, [(replica, token), _] = job
    # A pull that claimed c000000 and then died, before leasing it or putting it back.
    claimed = chunks._claim_first_pass(aws_account, job_id)
    assert int(claimed["next_chunk_index"]) == 1
    job_item = _job_item(aws_account, job_id)
    # The counters show the gap at once, but the job must be quiet before the chunks are read.
    assert chunks.recover_unreachable(aws_account, job_item, clock.time()) == 0
    later = clock.time() + chunks.UNREACHABLE_QUIET_SECONDS + 1
    assert chunks.recover_unreachable(aws_account, job_item, later) == 1
    assert _job_item(aws_account, job_id)["requeued"] == {0}
    assert support.pull(client, job_id, replica, token).json_body["chunk_id"] == "c000000"
    assert chunks.recover_unreachable(aws_account, _job_item(aws_account, job_id), later) == 0
    assert_counters_match_items(client, aws_account, job_id)


def test_claim_requeued_for_killed_replica(client, aws_account, job):
    job_id, [(replica, _), (other, other_token)] = job
    support.post(client, f"/job/{job_id}/kill", {"replica_ids": [replica]})
    replica_item = {"replica_id": replica, "phase": "running"}
    # The stored phase is killed, so the lease transaction rejects the replica after the claim.
    assert chunks.pull(aws_account, job_id, replica_item) is None
    assert _job_item(aws_account, job_id)["requeued"] == {0}
    lease = support.pull(client, job_id, other, other_token).json_body
    assert lease["chunk_id"] == "c000000"
    assert "requeued" not in _job_item(aws_account, job_id)
    assert_counters_match_items(client, aws_account, job_id)


def test_stale_requeued_entry_removed(client, aws_account, job):
    job_id, [(replica, token), _] = job
    first = support.pull(client, job_id, replica, token).json_body
    assert first["chunk_id"] == "c000000"
    # A stale entry: c000000 is inflight but listed as requeued.
    aws.client("dynamodb").update_item(
        TableName=aws_account.jobs_table,
        Key={"job_id": {"S": job_id}},
        UpdateExpression="ADD requeued :s",
        ExpressionAttributeValues={":s": {"NS": ["0"]}},
    )
    second = support.pull(client, job_id, replica, token).json_body
    assert second["chunk_id"] == "c000001"
    assert "requeued" not in _job_item(aws_account, job_id)
    assert_counters_match_items(client, aws_account, job_id)


def test_failed_assembly_releases_its_lease(client, aws_account, job, monkeypatch):
    from chalicelib import assembly, storage

    job_id, [(replica, token), _] = job
    real_close = storage.MultipartWriter.close
    failures = []

    def close_failing_once(writer):
        if not failures:
            failures.append(writer)
            raise RuntimeError("injected upload failure")
        return real_close(writer)

    monkeypatch.setattr(storage.MultipartWriter, "close", close_failing_once)
    for _ in range(5):
        lease = support.pull(client, job_id, replica, token).json_body
        support.write_output(aws_account, lease)
        support.complete(client, job_id, replica, token, lease)
    assert failures
    failed = _job_item(aws_account, job_id)
    assert failed["status"] == "assembling"
    assert int(failed["assembly_lease_until"]) == 0
    assert assembly.assemble(aws_account, job_id)["status"] == "succeeded"
