"""Spot interruptions: the EventBridge rule for "EC2 Spot Instance Interruption Warning" invokes
``handle_interruption`` two minutes before EC2 reclaims a spot instance.

The instance's tags name its job and replica. A replica that was running becomes ``preempting``.
Its heartbeat response then asks the sidecar to drain (the sidecar may also have seen the
notice in the instance metadata itself), and its leases return without spending retries. A replacement is
launched when the job still has work and, without it, would miss its deadline. A replica still
starting ends its launch wait, so the launch state machine moves to the next candidate.
"""

from __future__ import annotations

import logging
from typing import Any

from botocore.exceptions import ClientError

from chalicelib import aws, deadline, jobs, lifecycle, replicas
from chalicelib.config import Settings
from chalicelib.errors import Conflict
from chalicelib.states import JOB_ACCEPTS_WORK, ReplicaPhase

logger = logging.getLogger(__name__)

# Phases of a replica that does work. A spot notice turns them into preempting.
WORKING = (ReplicaPhase.MODEL_READY, ReplicaPhase.RUNNING)


def _tags_of(instance_id: str, region: str) -> dict[str, str]:
    try:
        response = aws.regional_client("ec2", region).describe_instances(InstanceIds=[instance_id])
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") == "InvalidInstanceID.NotFound":
            return {}
        raise
    for reservation in response.get("Reservations", []):
        for instance in reservation.get("Instances", []):
            return {tag["Key"]: tag["Value"] for tag in instance.get("Tags", [])}
    return {}


def handle_interruption(settings: Settings, event: dict[str, Any]) -> dict[str, Any]:
    detail = event.get("detail") or {}
    instance_id = detail.get("instance-id")
    region = event.get("region") or settings.region
    if not instance_id:
        logger.warning("spot interruption event without an instance id", extra={"event": event})
        return {"handled": False, "reason": "no instance-id in the event"}
    tags = _tags_of(instance_id, region)
    job_id, replica_id = tags.get("tandemn:job-id"), tags.get("tandemn:replica-id")
    ids = {"instance_id": instance_id, "job_id": job_id, "replica_id": replica_id}
    if not job_id or not replica_id:
        logger.info("spot interruption of an instance that is not a replica", extra=ids)
        return {"handled": False, "reason": "instance has no tandemn tags"}
    replica = replicas.get_replica(settings, job_id, replica_id)
    if replica is None:
        return {"handled": False, "reason": "replica not found"}
    reason = f"spot interruption notice for {instance_id} ({detail.get('instance-action')})"
    phase = ReplicaPhase(replica["phase"])
    if phase in lifecycle.STARTING:
        moved_on = lifecycle.on_preempted_while_starting(settings, job_id, replica_id, reason)
        logger.warning("spot instance interrupted while starting", extra={**ids, "phase": phase})
        return {"handled": moved_on, "phase": phase.value, "replacement": None}
    if phase not in WORKING:
        return {"handled": False, "phase": phase.value, "reason": "replica is not working"}
    try:
        replicas.transition_replica(
            settings, job_id, replica_id, ReplicaPhase.PREEMPTING, reason=reason
        )
    except Conflict:
        # A second delivery of the same event, or the replica ended meanwhile.
        return {"handled": False, "phase": phase.value, "reason": "replica changed phase"}
    logger.warning("replica preempting after a spot interruption notice", extra=ids)
    replacement = _replace_if_needed(settings, job_id, replica)
    return {"handled": True, "phase": ReplicaPhase.PREEMPTING.value, "replacement": replacement}


def _replace_if_needed(
    settings: Settings, job_id: str, replica: dict[str, Any]
) -> dict[str, Any] | None:
    job = jobs.get_job(settings, job_id)
    if job["status"] not in {s.value for s in JOB_ACCEPTS_WORK}:
        return None
    working = [
        r
        for r in replicas.list_replicas(settings, job_id)
        if ReplicaPhase(r["phase"]) in (*lifecycle.STARTING, *WORKING)
    ]
    live_after = len(working)
    if not deadline.needs_replacement(job, live_after + 1, live_after):
        logger.info(
            "no replacement needed after a preemption",
            extra={"job_id": job_id, "replica_id": replica["replica_id"], "working": live_after},
        )
        return None
    registered = replicas.register_replicas(
        settings,
        job_id,
        1,
        provider=replica.get("provider", "ec2"),
        config=lifecycle.replica_config(replica.get("candidates") or []),
    )
    logger.info(
        "replacement replica launched after a preemption",
        extra={"job_id": job_id, "replica_id": replica["replica_id"], **registered},
    )
    return {
        "version": registered["version"],
        "replica_ids": [entry["replica_id"] for entry in registered["replicas"]],
    }
