"""Replica liveness and deadline checks that the watchdog runs for each active job.

A working replica (``model_ready``, ``running``, ``draining``, ``preempting``) whose last
heartbeat, in server time, is older than ``dead_after_seconds`` (90 by default) becomes ``dead``
and its leases return to the queue at once. The chunks of a replica that died while working
spend one retry, as an expired lease would. Those of a draining or preempting replica do not.
A replica dead for ``DEAD_TERMINATE_SECONDS`` is terminated and ``failed``. A launched replica
that died is replaced when the job would otherwise miss its deadline.

Starting replicas are watched by their launch execution's heartbeat timeout instead.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from botocore.exceptions import ClientError

from chalicelib import aws, chunks, deadline, dynamo, jobs, lifecycle, replicas
from chalicelib.config import Settings
from chalicelib.states import ReplicaPhase

logger = logging.getLogger(__name__)

WATCHED = (
    ReplicaPhase.MODEL_READY,
    ReplicaPhase.RUNNING,
    ReplicaPhase.DRAINING,
    ReplicaPhase.PREEMPTING,
)
# A dead replica's machine is terminated after this long without a heartbeat coming back.
DEAD_TERMINATE_SECONDS = 600


def _mark_dead(settings: Settings, replica: dict[str, Any], cutoff: float, seconds: float) -> bool:
    """Moves a silent replica to dead, unless a heartbeat arrived since it was read."""
    values = {
        ":dead": ReplicaPhase.DEAD.value,
        ":phase": replica["phase"],
        ":cutoff": cutoff,
        ":now": time.time(),
        ":reason": f"no heartbeat for {seconds:.0f} s",
    }
    try:
        aws.client("dynamodb").update_item(
            TableName=settings.replicas_table,
            Key={"job_id": {"S": replica["job_id"]}, "replica_id": {"S": replica["replica_id"]}},
            UpdateExpression="SET phase = :dead, phase_reason = :reason, updated_at = :now",
            ConditionExpression="phase = :phase AND (attribute_not_exists(last_heartbeat) "
            "OR last_heartbeat < :cutoff)",
            ExpressionAttributeValues=dynamo.serialize(values),
        )
    except ClientError as error:
        if dynamo.is_condition_failure(error):
            return False
        raise
    return True


def check_replicas(settings: Settings, job: dict[str, Any], now: float) -> dict[str, list[str]]:
    """Marks silent replicas dead and ends replicas dead for too long; returns their ids."""
    dead_after = lifecycle.load_lifecycle_settings().dead_after_seconds
    job_id = job["job_id"]
    found = replicas.list_replicas(settings, job_id)
    died: list[str] = []
    ended: list[str] = []
    for replica in found:
        phase = ReplicaPhase(replica["phase"])
        if phase == ReplicaPhase.DEAD:
            if now - float(replica.get("updated_at", now)) > DEAD_TERMINATE_SECONDS:
                reason = f"no heartbeat for more than {DEAD_TERMINATE_SECONDS} s"
                if lifecycle.stop_replica(settings, replica, ReplicaPhase.FAILED, reason):
                    ended.append(replica["replica_id"])
            continue
        if phase not in WATCHED:
            continue
        last = float(replica.get("last_heartbeat") or replica.get("updated_at") or now)
        silent = now - last
        if silent <= dead_after:
            continue
        if not _mark_dead(settings, replica, now - dead_after, silent):
            continue
        died.append(replica["replica_id"])
        spend = phase in (ReplicaPhase.MODEL_READY, ReplicaPhase.RUNNING)
        returned = chunks.reclaim_owned_by(
            settings, job_id, replica["replica_id"], spend_failure=spend
        )
        logger.warning(
            "replica marked dead",
            extra={
                "job_id": job_id,
                "replica_id": replica["replica_id"],
                "seconds_silent": round(silent, 1),
                "chunks_returned": returned,
            },
        )
    if died:
        _replace_dead(settings, job_id, found, died)
    return {"dead": died, "ended": ended}


def _replace_dead(
    settings: Settings, job_id: str, found: list[dict[str, Any]], died: list[str]
) -> None:
    launched = [r for r in found if r["replica_id"] in died and r.get("provider") != "external"]
    if not launched:
        return
    working_phases = (*lifecycle.STARTING, ReplicaPhase.MODEL_READY, ReplicaPhase.RUNNING)
    working_after = sum(
        1
        for r in found
        if r["replica_id"] not in died and ReplicaPhase(r["phase"]) in working_phases
    )
    job = jobs.get_job(settings, job_id)
    if lifecycle.job_is_over(job):
        return
    if not deadline.needs_replacement(job, working_after + len(died), working_after):
        return
    template = launched[0]
    registered = replicas.register_replicas(
        settings,
        job_id,
        len(launched),
        provider=template["provider"],
        config=lifecycle.replica_config(template.get("candidates") or []),
    )
    logger.warning(
        "replacement replicas launched for dead replicas",
        extra={"job_id": job_id, "dead": died, "version": registered["version"]},
    )


def check_deadline(settings: Settings, job: dict[str, Any], now: float) -> bool | None:
    """Flags a job that will miss its deadline at its current pace.

    Writes ``deadline_at_risk`` and ``projected_finish_at`` on the job when the flag changes and
    returns the new flag; returns None when nothing changed.
    """
    projection = deadline.project(job, now)
    if projection.at_risk == bool(job.get("deadline_at_risk")):
        return None
    values = {
        ":risk": projection.at_risk,
        ":finish": projection.projected_finish_at or 0,
        ":deadline": projection.deadline_at,
    }
    aws.client("dynamodb").update_item(
        TableName=settings.jobs_table,
        Key={"job_id": {"S": job["job_id"]}},
        UpdateExpression="SET deadline_at_risk = :risk, projected_finish_at = :finish, "
        "deadline_at = :deadline",
        ConditionExpression="attribute_exists(job_id)",
        ExpressionAttributeValues=dynamo.serialize(values),
    )
    log = logger.warning if projection.at_risk else logger.info
    log(
        "job deadline projection changed",
        extra={
            "job_id": job["job_id"],
            "at_risk": projection.at_risk,
            "deadline_at": projection.deadline_at,
            "projected_finish_at": projection.projected_finish_at,
            "remaining_chunks": projection.remaining_chunks,
        },
    )
    return projection.at_risk
