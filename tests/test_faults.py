"""Fault injection on the local stack: replicas killed, paused and preempted, AWS requests failing,
the API process killed mid-job, Lambda tasks run twice. Each case ends with the same invariant
check (``tests/fault_support.check_job_invariants``): every ``custom_id`` exactly once across
``output.jsonl`` and ``errors.jsonl``, the job's counters equal to the chunk items, no chunk both
completed and queued, and no completion counted twice."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest

from tandemn.api_client import ApiError
from tests import support
from tests.fault_support import (
    BotocoreFaults,
    Cluster,
    FakeMetadataServer,
    check_job_invariants,
    process_state,
    start_pausing_replica,
    start_replica,
)
from tests.localstack_support import PROJECT_DIR, llama_stack, processes_with_argument


def ids_for(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{i:04d}" for i in range(count)]


def wait_until(condition, timeout: float, message: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")


def leases_held(cluster: Cluster, job_id: str) -> dict[str, str]:
    """Returns chunk id -> owner of every inflight chunk, read from the chunk items."""
    return {
        c["chunk_id"]: c["lease_owner"]
        for c in all_chunks(cluster, job_id)
        if c["status"] == "inflight"
    }


def all_chunks(cluster: Cluster, job_id: str) -> list[dict]:
    from tandemn.stack import _stage_environment
    from tests.fault_support import _query_chunks

    return _query_chunks(cluster.dynamodb(), _stage_environment("local")["CHUNKS_TABLE"], job_id)


def chunk_item(cluster: Cluster, job_id: str, chunk_id: str) -> dict:
    return next(c for c in all_chunks(cluster, job_id) if c["chunk_id"] == chunk_id)


@pytest.fixture
def cluster(request):
    name = request.node.name.replace("[", "-").replace("]", "")
    with Cluster(name) as running:
        yield running


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11])
def test_sigkill_at_random_moments(cluster, seed):
    rng = random.Random(seed)
    ids = ids_for("kill", 60)
    job_id = cluster.submit(ids, chunk_size=2, max_tokens=150)
    running = {
        rid: start_replica(cluster, job_id, rid, token)
        for rid, token in cluster.add_replicas(job_id, 3).items()
    }
    wait_until(lambda: leases_held(cluster, job_id), 60, "a first lease")
    killed = []
    for _ in range(4):
        time.sleep(rng.uniform(0.3, 2.0))
        owners = sorted(set(leases_held(cluster, job_id).values()) & set(running))
        victim = rng.choice(owners or sorted(running))
        running.pop(victim).stop(signal.SIGKILL)
        killed.append(victim)
        ((rid, token),) = cluster.add_replicas(job_id, 1).items()
        running[rid] = start_replica(cluster, job_id, rid, token)
    try:
        job = cluster.wait_for_job(job_id, 240)
    finally:
        for replica in running.values():
            replica.stop()
    report = check_job_invariants(cluster.moto_url, job_id, ids)
    assert len(killed) == 4
    assert any(int(c["attempts"]) > 1 for c in report.chunks), "no lease was ever reclaimed"
    # A chunk fails only after three lost attempts; then its requests are error records.
    exhausted = [c for c in report.chunks if c["status"] == "failed"]
    assert all(int(c["failures"]) == 3 for c in exhausted)
    assert job["status"] == ("completed_with_errors" if exhausted else "succeeded")


@pytest.mark.slow
def test_real_engine_sigkill_at_random_moment(tmp_path):
    from tandemn.api_client import ApiClient

    rng = random.Random(7)
    stack = llama_stack(
        PROJECT_DIR / "test-artifacts" / "faults" / "llama-kill-stack.log", "--lease-seconds", "10"
    )
    try:
        stack.wait_ready()
        client = ApiClient(stack.url)
        ids = ids_for("llama", 10)
        lines = [support.request_line(i, content="Name one ocean.", max_tokens=16) for i in ids]
        (tmp_path / "in.jsonl").write_bytes(support.jsonl(lines))
        uri = client.upload(tmp_path / "in.jsonl")
        submitted = client.post(
            "/submit/batch",
            {
                "model_name": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "input_file": uri,
                "replicas": 2,
                "chunk_size": 2,
            },
        )
        job_id = submitted["job_id"]
        victim = submitted["replicas"][0]
        wait_until(
            lambda: (
                client.get(f"/job/{job_id}")["chunks"]["inflight"] >= 1
                and processes_with_argument(f"--replica-id {victim}")
            ),
            240,
            "the first lease",
        )
        time.sleep(rng.uniform(0.0, 1.5))
        for pid in processes_with_argument(f"--replica-id {victim}"):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            job = client.get(f"/job/{job_id}")
            if job["status"] in ("succeeded", "completed_with_errors", "failed", "cancelled"):
                break
            time.sleep(0.5)
        report = check_job_invariants(f"http://127.0.0.1:{stack.port + 1}", job_id, ids)
        assert report.job["status"] == "succeeded"
        contents = [
            r["response"]["body"]["choices"][0]["message"]["content"] for r in report.output
        ]
        assert all(text.strip() for text in contents)
    finally:
        assert stack.stop() == 0


@pytest.mark.slow
def test_sidecar_paused_past_its_lease(cluster):
    ids = ids_for("pause", 24)
    job_id = cluster.submit(ids, chunk_size=2, max_tokens=300)
    tokens = cluster.add_replicas(job_id, 2)
    replicas = {rid: start_replica(cluster, job_id, rid, t) for rid, t in tokens.items()}
    victim = min(replicas)
    sidecar_pid = replicas[victim].sidecar.pid

    def stop_while_holding_a_lease() -> list[str]:
        # Read the leases after the stop: one read before it may list a chunk completed since.
        if not [owner for owner in leases_held(cluster, job_id).values() if owner == victim]:
            return []
        os.kill(sidecar_pid, signal.SIGSTOP)
        time.sleep(0.5)
        held = [c for c, owner in leases_held(cluster, job_id).items() if owner == victim]
        if not held:
            os.kill(sidecar_pid, signal.SIGCONT)
        return held

    victim_chunks = wait_until(stop_while_holding_a_lease, 60, f"{victim} stopped with a lease")
    try:
        # The paused lease expires, the watchdog takes it back and the other replica leases it
        # again. Resuming before that re-lease would let the paused replica's late completion
        # win with the first attempt, which is allowed but not the case under test.
        wait_until(
            lambda: int(chunk_item(cluster, job_id, victim_chunks[0]).get("attempts", 1)) >= 2,
            cluster.lease_seconds + 40,
            f"{victim_chunks[0]} taken back from {victim} and leased again",
        )
        assert process_state(sidecar_pid) == "T"
    finally:
        os.kill(sidecar_pid, signal.SIGCONT)
    try:
        cluster.wait_for_job(job_id, 240)
    finally:
        for replica in replicas.values():
            replica.stop()
    report = check_job_invariants(cluster.moto_url, job_id, ids)
    assert report.job["status"] == "succeeded"
    assert int(report.chunk(victim_chunks[0])["attempts"]) >= 2


@pytest.mark.slow
def test_late_completion_counts_once(cluster, tmp_path):
    ids = ids_for("late", 8)
    job_id = cluster.submit(ids, chunk_size=2)
    tokens = cluster.add_replicas(job_id, 3)
    first, second, finisher = sorted(tokens)

    # The first replica uploads its output for a chunk and stops before completing it.
    first_result = tmp_path / "first.jsonl"
    paused_first = start_pausing_replica(cluster, job_id, first, tokens[first], first_result)
    wait_until(lambda: process_state(paused_first.pid) == "T", 60, f"{first} stopped")
    chunk_id = json.loads(first_result.read_text().splitlines()[0])["lease"]["chunk_id"]

    # Its lease expires, so the chunk goes back to the front of the queue and the second replica
    # takes it, uploads and stops too.
    wait_until(
        lambda: chunk_item(cluster, job_id, chunk_id)["status"] == "pending",
        cluster.lease_seconds + 20,
        f"{chunk_id} reclaimed",
    )
    second_result = tmp_path / "second.jsonl"
    paused_second = start_pausing_replica(cluster, job_id, second, tokens[second], second_result)
    wait_until(lambda: process_state(paused_second.pid) == "T", 60, f"{second} stopped")
    assert json.loads(second_result.read_text().splitlines()[0])["lease"]["chunk_id"] == chunk_id

    # The stale attempt finishes first: its completion counts, the current holder's does not.
    os.kill(paused_first.pid, signal.SIGCONT)
    assert paused_first.wait(timeout=60) == 0
    os.kill(paused_second.pid, signal.SIGCONT)
    assert paused_second.wait(timeout=60) == 0
    first_answer = json.loads(first_result.read_text().splitlines()[1])["completion"]
    second_answer = json.loads(second_result.read_text().splitlines()[1])["completion"]
    assert first_answer["status"] == "completed"
    assert second_answer["status"] == "already_completed"

    replica = start_replica(cluster, job_id, finisher, tokens[finisher])
    try:
        cluster.wait_for_job(job_id, 120)
    finally:
        replica.stop()
    report = check_job_invariants(cluster.moto_url, job_id, ids)
    assert report.job["status"] == "succeeded"
    chunk = report.chunk(chunk_id)
    assert chunk["completed_by"] == first
    completions = {r["replica_id"]: int(r.get("chunks_completed", 0)) for r in report.replicas}
    assert completions[first] == 1
    assert completions[second] == 0
    lease_ids = {
        r["custom_id"]
        for r in report.output
        if r["response"]["body"]["choices"][0]["message"]["content"] == first
    }
    assert len(lease_ids) == int(chunk["request_count"])


@pytest.mark.slow
def test_spot_notice_mid_chunk_drains(cluster):
    metadata = FakeMetadataServer().start()
    try:
        ids = ids_for("spot", 16)
        job_id = cluster.submit(ids, chunk_size=2, max_tokens=5000)
        tokens = cluster.add_replicas(job_id, 2)
        spot_id, other_id = sorted(tokens)
        spot = start_replica(
            cluster,
            job_id,
            spot_id,
            tokens[spot_id],
            drain_seconds=1,
            spot_notice_url=metadata.url + FakeMetadataServer.NOTICE_PATH,
            metadata_token_url=metadata.url + FakeMetadataServer.TOKEN_PATH,
        )
        wait_until(
            lambda: spot_id in leases_held(cluster, job_id).values(),
            60,
            f"a lease held by {spot_id}",
        )
        wait_until(lambda: metadata.notice_reads > 0, 30, "a first notice check")
        metadata.announce_interruption()
        # Each request runs 10 s on the simulated engine, so a held chunk cannot finish within
        # the 1 s drain: the sidecar releases what it holds and exits.
        assert spot.sidecar.wait(timeout=60) == 0
        assert leases_held(cluster, job_id) == {}
        released = [
            c
            for c in all_chunks(cluster, job_id)
            if c["status"] == "pending" and int(c["attempts"])
        ]
        assert released, f"{spot_id} released no chunk"
        assert all(int(c["failures"]) == 0 for c in released)
        phase = {
            r["replica_id"]: r["phase"]
            for r in cluster.client().get(f"/job/{job_id}/replicas")["replicas"]
        }
        assert phase[spot_id] == "draining"
        other = start_replica(cluster, job_id, other_id, tokens[other_id], slots=4)
        try:
            cluster.wait_for_job(job_id, 240)
        finally:
            other.stop()
            spot.stop()
    finally:
        metadata.stop()
    report = check_job_invariants(cluster.moto_url, job_id, ids)
    assert report.job["status"] == "succeeded"
    assert metadata.unauthorised_reads == 0
    assert all(int(c["failures"]) == 0 for c in report.chunks)
    assert all(report.chunk(c["chunk_id"])["completed_by"] == other_id for c in released)


@pytest.mark.slow
def test_aws_errors_are_retried():
    with Cluster("throttled", fault_rate=0.25, fault_seed=5) as cluster:
        ids = ids_for("throttle", 40)
        job_id = wait_until(
            lambda: _submit_until_accepted(cluster, ids), 60, "a submission through the faults"
        )
        tokens = wait_until(lambda: _scale_until_accepted(cluster, job_id), 60, "a scale call")
        replicas = [start_replica(cluster, job_id, rid, t) for rid, t in tokens.items()]
        try:
            cluster.wait_for_job(job_id, 240)
        finally:
            for replica in replicas:
                replica.stop()
        report = check_job_invariants(cluster.moto_url, job_id, ids)
        injected = [line for line in cluster.api_log().splitlines() if "injected fault" in line]
    assert len(injected) > 50
    assert report.job["status"] == "succeeded"


def _submit_until_accepted(cluster: Cluster, ids: list[str]) -> str | None:
    # The user's own calls meet the injected faults too, so they are repeated until one succeeds.
    try:
        return cluster.submit(ids, chunk_size=2)
    except ApiError:
        return None


def _scale_until_accepted(cluster: Cluster, job_id: str) -> dict[str, str] | None:
    try:
        return cluster.add_replicas(job_id, 2)
    except ApiError:
        return None


def test_route_returns_503_after_throttling(client, aws_account):
    from chalicelib import aws

    submitted = support.submit_job(client, aws_account, 4, chunk_size=1)
    tokens = support.add_replicas(client, submitted["job_id"], 1)
    ((replica_id, token),) = tokens.items()
    faults = BotocoreFaults(rate=1.0, seed=1)
    faults.install(aws.client("dynamodb"))
    try:
        response = support.pull(client, submitted["job_id"], replica_id, token)
    finally:
        aws.client("dynamodb").meta.events.unregister("before-send", faults)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.json_body["code"] == "service_unavailable"
    assert sum(faults.injected.values()) >= 2, "botocore did not retry the throttled request"
    retried = support.pull(client, submitted["job_id"], replica_id, token)
    assert retried.status_code == 200
    assert retried.json_body["chunk_id"] == "c000000"


@pytest.mark.slow
def test_api_process_killed_mid_job(cluster):
    ids = ids_for("restart", 40)
    job_id = cluster.submit(ids, chunk_size=2, max_tokens=300)
    tokens = cluster.add_replicas(job_id, 2)
    replicas = [start_replica(cluster, job_id, rid, t) for rid, t in tokens.items()]
    try:
        wait_until(
            lambda: cluster.client().get(f"/job/{job_id}")["chunks"]["completed"] >= 5,
            120,
            "five completed chunks",
        )
        cluster.kill_api()
        time.sleep(3)
        cluster.start_api()
        cluster.wait_for_job(job_id, 240)
    finally:
        for replica in replicas:
            replica.stop()
    report = check_job_invariants(cluster.moto_url, job_id, ids)
    assert report.job["status"] == "succeeded"
    assert cluster.api_starts == 2


def _invoke_task(client, payload: dict) -> dict:
    return client.lambda_.invoke("lifecycle_task", payload).payload


@pytest.fixture
def recorded_replica(client, aws_account, monkeypatch):
    """Registers one replica on the recording provider and yields (provider, job_id, replica_id).

    No state machine runs: each test plays Step Functions and invokes the lifecycle tasks itself.
    """
    from chalicelib import lifecycle, providers, replicas
    from tests.lifecycle_support import RecordingProvider

    monkeypatch.setattr(lifecycle, "start_scale", lambda *args, **kwargs: "no-execution")
    provider = RecordingProvider()
    providers.register(provider)
    try:
        job_id = support.submit_job(client, aws_account, 4, chunk_size=2)["job_id"]
        registered = replicas.register_replicas(
            aws_account, job_id, 1, provider="recording", config={"gpu_type": "L4"}
        )
        yield provider, job_id, registered["replicas"][0]["replica_id"]
    finally:
        providers.unregister(provider.name)


def _abandon_task(job_id: str, replica_id: str) -> dict:
    return {
        "task": "abandon_candidate",
        "job_id": job_id,
        "replica_id": replica_id,
        "error": "States.Timeout",
        "cause": "",
    }


def test_launch_task_run_twice_launches_once(client, aws_account, recorded_replica):
    from chalicelib import replicas

    provider, job_id, replica_id = recorded_replica
    # The same task runs twice, as a Retry on Lambda.ServiceException does when the first
    # invocation already launched.
    task = {"task": "launch_candidate", "job_id": job_id, "replica_id": replica_id}
    first = _invoke_task(client, task)
    second = _invoke_task(client, task)
    assert first["outcome"] == "launched"
    assert second == first
    assert len(provider.launches_of(replica_id)) == 1
    replica = replicas.get_replica(aws_account, job_id, replica_id)
    assert replica["token_hash"] == replicas.hash_token(provider.launches_of(replica_id)[0].token)

    moved = _invoke_task(client, _abandon_task(job_id, replica_id))
    again = _invoke_task(client, _abandon_task(job_id, replica_id))
    assert again == moved
    replica = replicas.get_replica(aws_account, job_id, replica_id)
    assert int(replica["candidate_index"]) == 1
    outcomes = [a["outcome"] for a in replica["launch_attempts"]]
    assert outcomes == ["launched", "abandoned"]


def test_launch_task_after_crash_terminates_first(
    client, aws_account, recorded_replica, monkeypatch
):
    from chalicelib import lifecycle, replicas

    provider, job_id, replica_id = recorded_replica
    record_launched = lifecycle._record_launched
    crashes = []

    def crash_once(*args, **kwargs):
        # The first invocation dies after the instance started and before it was recorded.
        if not crashes:
            crashes.append(args)
            raise RuntimeError("Lambda stopped")
        return record_launched(*args, **kwargs)

    monkeypatch.setattr(lifecycle, "_record_launched", crash_once)
    task = {"task": "launch_candidate", "job_id": job_id, "replica_id": replica_id}
    with pytest.raises(Exception, match="Lambda stopped"):
        _invoke_task(client, task)
    retried = _invoke_task(client, task)

    assert retried["outcome"] == "launched"
    first, second = provider.launches_of(replica_id)
    terminations = provider.terminated(replica_id)
    assert len(terminations) == 1
    assert first.at <= terminations[0] <= second.at
    replica = replicas.get_replica(aws_account, job_id, replica_id)
    assert replica["token_hash"] == replicas.hash_token(second.token)
    assert [a["outcome"] for a in replica["launch_attempts"]] == ["launched"]


def test_abandon_of_stopped_replica_records_nothing(client, aws_account, recorded_replica):
    from chalicelib import replicas
    from chalicelib.states import ReplicaPhase

    _, job_id, replica_id = recorded_replica
    launch = {"task": "launch_candidate", "job_id": job_id, "replica_id": replica_id}
    assert _invoke_task(client, launch)["outcome"] == "launched"
    replicas.transition_replica(aws_account, job_id, replica_id, ReplicaPhase.KILLED)

    with pytest.raises(Exception, match="changed while its attempt was abandoned"):
        _invoke_task(client, _abandon_task(job_id, replica_id))
    replica = replicas.get_replica(aws_account, job_id, replica_id)
    assert [a["outcome"] for a in replica["launch_attempts"]] == ["launched"]
    assert int(replica["candidate_index"]) == 0


def test_teardown_tasks_run_twice_change_nothing(client, aws_account, monkeypatch):
    from chalicelib import teardown

    # The teardown starts only from the tasks below, as the state machine would run them.
    monkeypatch.setattr(teardown, "start_teardown", lambda *args, **kwargs: None)
    submitted = support.submit_job(client, aws_account, 6, chunk_size=2)
    job_id = submitted["job_id"]
    ((replica_id, token),) = support.add_replicas(client, job_id, 1).items()
    while True:
        pulled = support.pull(client, job_id, replica_id, token)
        if pulled.status_code == 204:
            break
        lease = pulled.json_body
        support.write_output(aws_account, lease)
        assert support.complete(client, job_id, replica_id, token, lease).status_code == 200

    results = {}
    for name in ("assemble", "write_report", "terminate_all"):
        task = {"task": name, "job_id": job_id}
        results[name] = [_invoke_task(client, task), _invoke_task(client, task)]
    job_after_first = support.get(client, f"/job/{job_id}").json_body
    output_first = support.read_jsonl(aws_account.bucket, f"jobs/{job_id}/output.jsonl")
    again = _invoke_task(client, {"task": "assemble", "job_id": job_id})

    assert results["assemble"][0]["status"] == "succeeded"
    assert results["assemble"][1] == results["assemble"][0]
    assert again == results["assemble"][0]
    assert results["write_report"][0] == results["write_report"][1]
    assert results["terminate_all"][1]["terminated"] == results["terminate_all"][0]["terminated"]
    job = support.get(client, f"/job/{job_id}").json_body
    assert job["status"] == "succeeded"
    assert job.get("finished_at") == job_after_first.get("finished_at")
    output = support.read_jsonl(aws_account.bucket, f"jobs/{job_id}/output.jsonl")
    assert output == output_first
    assert sorted(r["custom_id"] for r in output) == [f"req-{i:05d}" for i in range(6)]
