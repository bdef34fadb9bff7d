"""Swap through the swap state machine, run by moto's interpreter."""

from __future__ import annotations

import time

from chalicelib import chunks
from tests import support
from tests.lifecycle_support import (
    submit,
    wait_for,
)


def _work_chunk(stack, job_id: str, replica_id: str, token: str) -> dict | None:
    """Pulls, writes and completes one chunk as the replica would; None when none is pending."""
    response = support.pull(stack.client, job_id, replica_id, token)
    if response.status_code == 204:
        return None
    lease = response.json_body
    support.write_output(stack.settings, lease)
    completed = support.complete(stack.client, job_id, replica_id, token, lease)
    assert completed.status_code == 200, completed.body
    return lease


def test_swap_waits_for_threshold_and_loses_nothing(lifecycle_stack):
    stack = lifecycle_stack
    job = submit(stack, 12, 2)
    job_id = job["job_id"]
    old = f"{job_id}-r0"
    old_token = stack.report_ready(job_id, old)
    assert _work_chunk(stack, job_id, old, old_token)["chunk_id"] == "c000000"
    held = support.pull(stack.client, job_id, old, old_token).json_body
    assert held["chunk_id"] == "c000001"

    response = support.post(
        stack.client,
        f"/job/{job_id}/swap",
        {"gpu_type": "L40S", "num_replicas": 1, "ready_threshold": 1},
    )
    assert response.status_code == 200, response.body
    swap = response.json_body
    new = f"{job_id}-v2-r0"
    assert swap == {
        "status": "swapping",
        "old_replicas": [old],
        "new_replicas": [new],
        "ready_threshold": 1,
        "version": 2,
    }
    second = support.post(stack.client, f"/job/{job_id}/swap", {"gpu_type": "A10G"})
    assert second.status_code == 409
    assert "already" in second.json_body["message"]

    new_token = stack.report_ready(job_id, new)
    assert stack.provider.launches_of(new)[0].config["gpu_type"] == "L40S"
    # Ready is not enough: the old replica keeps working until a new one completed a chunk.
    time.sleep(2.5)
    assert stack.replica(job_id, old)["phase"] == "model_ready"
    assert stack.provider.terminated(old) == []
    assert _work_chunk(stack, job_id, old, old_token)["chunk_id"] == "c000002"

    completed = _work_chunk(stack, job_id, new, new_token)
    completed_at = time.time()
    assert completed["chunk_id"] == "c000003"
    assert stack.replica(job_id, new)["chunks_completed"] == 1

    retired = stack.wait_phase(job_id, old, "swapped_out", timeout=15)
    assert retired["phase_reason"] == "swapped out by swap version 2"
    # The replica is marked swapped_out before its machine is terminated.
    terminated = wait_for(lambda: stack.provider.terminated(old), 5, f"termination of {old}")
    assert terminated[0] > completed_at
    # The chunk the old replica held went back without spending a retry.
    returned = chunks.get_chunk(stack.settings, job_id, 1)
    assert returned["status"] in ("pending", "inflight", "completed")
    assert returned["failures"] == 0
    execution = stack.wait_execution("swap", f"{job_id}-v2-swap")
    assert execution["status"] == "SUCCEEDED"
    view = support.get(stack.client, f"/job/{job_id}").json_body
    assert view["chunks"]["inflight"] == 0

    while _work_chunk(stack, job_id, new, new_token):
        pass
    final = wait_for(
        lambda: (
            (view := support.get(stack.client, f"/job/{job_id}").json_body)["status"] == "succeeded"
            and view
        ),
        message="job to succeed",
    )
    assert final["requests_succeeded"] == 12
    records = support.read_jsonl(stack.settings.bucket, f"jobs/{job_id}/output.jsonl")
    assert [r["custom_id"] for r in records] == [f"req-{i:05d}" for i in range(12)]
    # The old replica's late completion attempt of its held chunk is refused, not double counted.
    support.write_output(stack.settings, held)
    late = support.complete(stack.client, job_id, old, old_token, held)
    assert late.status_code in (200, 409)


def test_swap_cancel_kills_new_replicas(lifecycle_stack):
    stack = lifecycle_stack
    job = submit(stack, 6, 2)
    job_id = job["job_id"]
    old = f"{job_id}-r0"
    stack.report_ready(job_id, old)
    response = support.post(
        stack.client, f"/job/{job_id}/swap", {"tp_size": 2, "num_replicas": 2, "ready_threshold": 1}
    )
    assert response.status_code == 200, response.body
    new = response.json_body["new_replicas"]
    assert len(new) == 2
    wait_for(lambda: all(stack.provider.launches_of(r) for r in new), message="new launches")
    assert stack.provider.launches_of(new[0])[0].config["tp_size"] == 2

    cancel = support.post(stack.client, f"/job/{job_id}/swap", {"cancel": True})
    assert cancel.status_code == 200, cancel.body
    assert cancel.json_body["status"] == "cancelling"
    for replica_id in new:
        stack.wait_phase(job_id, replica_id, "killed", timeout=15)
        # The replica is marked killed before its machine is terminated.
        assert wait_for(lambda rid=replica_id: stack.provider.terminated(rid), 5, replica_id)
    execution = stack.wait_execution("swap", f"{job_id}-v2-swap")
    assert execution["status"] == "SUCCEEDED"
    assert stack.replica(job_id, old)["phase"] == "model_ready"
    again = support.post(stack.client, f"/job/{job_id}/swap", {"cancel": True})
    assert again.status_code == 409
    assert "no swap in progress" in again.json_body["message"]


def test_swap_to_same_placement_needs_force(lifecycle_stack):
    stack = lifecycle_stack
    job = submit(stack, 4, 2)
    job_id = job["job_id"]
    stack.report_ready(job_id, f"{job_id}-r0")
    response = support.post(stack.client, f"/job/{job_id}/swap", {})
    assert response.status_code == 409
    assert "force" in response.json_body["message"]
    too_high = support.post(
        stack.client, f"/job/{job_id}/swap", {"gpu_type": "L40S", "ready_threshold": 3}
    )
    assert too_high.status_code == 400
    assert too_high.json_body["field"] == "ready_threshold"
