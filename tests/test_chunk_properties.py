"""Property-based test of the chunk state machine: random sequences of pull, renew, complete,
release, lease expiry and kill from several replicas keep the queue's invariants."""

from __future__ import annotations

import time

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from moto import mock_aws

from chalicelib import aws, chunks, dynamo, jobs, replicas
from chalicelib.config import load_settings
from chalicelib.errors import Conflict, LeaseLost
from tandemn.resources import create_resources
from tests import support

NUM_CHUNKS = 6
NUM_REPLICAS = 3


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def __getattr__(self, name):
        return getattr(time, name)


class ChunkQueueMachine(RuleBasedStateMachine):
    @initialize()
    def start(self):
        self.mock = mock_aws()
        self.mock.start()
        aws.reset_clients()
        replicas.clear_auth_cache()
        self.clock = Clock()
        self.real_time = chunks.time
        chunks.time = self.clock
        self.settings = load_settings()
        create_resources(aws.client("dynamodb"), aws.client("s3"), self.settings)
        data = support.jsonl([support.request_line(f"p-{i}") for i in range(NUM_CHUNKS)])
        support.upload(self.settings.bucket, "inputs/p.jsonl", data)
        from chalicelib import submission
        from chalicelib.models import SubmitBatchRequest

        request = SubmitBatchRequest(
            model_name="m", input_file=f"s3://{self.settings.bucket}/inputs/p.jsonl", chunk_size=1
        )
        self.job_id = submission.submit(self.settings, request)["job_id"]
        registered = replicas.register_replicas(
            self.settings, self.job_id, NUM_REPLICAS, provider="external", config={}
        )
        self.replica_ids = [r["replica_id"] for r in registered["replicas"]]
        self.killed: set[str] = set()
        self.leases: list[tuple[str, str, str]] = []  # (replica, chunk_id, token)
        self.completed: set[str] = set()

    def teardown(self):
        chunks.time = self.real_time
        self.mock.stop()
        aws.reset_clients()
        replicas.clear_auth_cache()

    def _replica(self, index: int) -> dict:
        return replicas.get_replica(self.settings, self.job_id, self.replica_ids[index])

    @rule(replica=st.integers(0, NUM_REPLICAS - 1))
    def pull(self, replica):
        item = self._replica(replica)
        lease = chunks.pull(self.settings, self.job_id, item)
        if lease is None:
            return
        assert item["replica_id"] not in self.killed
        self.leases.append((item["replica_id"], lease.chunk_id, lease.lease_token))

    @precondition(lambda self: self.leases)
    @rule(pick=st.integers(0, 1000))
    def renew(self, pick):
        replica_id, chunk_id, token = self.leases[pick % len(self.leases)]
        chunk = chunks.get_chunk(self.settings, self.job_id, chunks.index_of(chunk_id))
        current = chunk.get("status") == "inflight" and chunk.get("lease_token") == token
        try:
            chunks.renew(self.settings, self.job_id, replica_id, chunk_id, token)
            assert current, "renew accepted a token that is not the chunk's current lease"
        except LeaseLost:
            assert not current, "renew rejected the chunk's current lease"

    @precondition(lambda self: self.leases)
    @rule(pick=st.integers(0, 1000))
    def complete(self, pick):
        replica_id, chunk_id, token = self.leases[pick % len(self.leases)]
        try:
            result = chunks.complete(
                self.settings, self.job_id, replica_id, chunk_id, token,
                output_key=None, object_exists=lambda key: True,
            )
        except Conflict:
            return
        if result.status == "completed":
            assert chunk_id not in self.completed, "a chunk was completed twice"
            self.completed.add(chunk_id)
        else:
            assert chunk_id in self.completed

    @precondition(lambda self: self.leases)
    @rule(pick=st.integers(0, 1000), error=st.booleans())
    def release(self, pick, error):
        replica_id, chunk_id, token = self.leases[pick % len(self.leases)]
        try:
            chunks.release(
                self.settings, self.job_id, replica_id, chunk_id, token,
                reason="error" if error else "drain", error_message="boom" if error else None,
            )
        except LeaseLost:
            pass

    @rule()
    def expire(self):
        self.clock.offset += self.settings.lease_seconds + 1
        chunks.reclaim_expired(self.settings, self.job_id)

    @rule(replica=st.integers(0, NUM_REPLICAS - 1))
    def kill(self, replica):
        replica_id = self.replica_ids[replica]
        replicas.kill_replicas(self.settings, self.job_id, [replica_id])
        self.killed.add(replica_id)

    def _chunk_items(self) -> list[dict]:
        response = aws.client("dynamodb").query(
            TableName=self.settings.chunks_table,
            KeyConditionExpression="job_id = :j",
            ExpressionAttributeValues={":j": {"S": self.job_id}},
            ConsistentRead=True,
        )
        return [dynamo.deserialize(item) for item in response["Items"]]

    @invariant()
    def counters_equal_chunk_items(self):
        job = jobs.get_job(self.settings, self.job_id)
        items = self._chunk_items()
        counted = {"pending": 0, "inflight": 0, "completed": 0, "failed": 0}
        for item in items:
            counted[item["status"]] += 1
        for status, count in counted.items():
            assert int(job[status]) == count, (status, job, counted)
        assert len(items) == NUM_CHUNKS

    @invariant()
    def every_pending_chunk_is_reachable(self):
        job = jobs.get_job(self.settings, self.job_id)
        requeued = job.get("requeued") or set()
        cursor = int(job["next_chunk_index"])
        for item in self._chunk_items():
            index = int(item["chunk_index"])
            if item["status"] == "pending":
                assert index >= cursor or index in requeued, f"chunk {index} is pending but unreachable"
            else:
                assert index not in requeued, f"chunk {index} is {item['status']} and requeued"
            if item["status"] == "inflight":
                assert item.get("lease_token") and item.get("lease_owner")
                assert item["lease_token"] in item["tokens"]
            else:
                assert "lease_token" not in item
            if item["status"] == "completed":
                assert item["chunk_id"] in self.completed
                assert item["completed_token"] in item["tokens"]
            assert int(item["failures"]) <= self.settings.max_chunk_failures


ChunkQueueMachine.TestCase.settings = settings(
    max_examples=15,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_chunk_state_machine = ChunkQueueMachine.TestCase
