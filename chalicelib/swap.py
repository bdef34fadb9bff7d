"""Swap: replace a job's replicas with replicas on another placement without losing a request.

``POST /job/{id}/swap`` registers the new replicas (version N, launched by the scale state
machine like any scale) and starts the swap execution ``<job>-vN-swap``. It checks every
``swap_poll_seconds`` how many new replicas have completed a chunk (``chunks_completed`` on the
replica item, added in the completion transaction). Once ``ready_threshold`` of them have, the
old replicas move to ``draining``: they stop pulling and finish or release their leases. After
``drain_seconds`` the leases they still have return to the queue without spending retries,
their machines are terminated, and they end ``swapped_out``.

The job item holds the swap: ``swap_state`` (``running``, ``draining``, then ``done``,
``cancelled`` or ``failed``) and ``swap`` (version, old and new replica ids, threshold). A second
swap while one runs is a 409. ``cancel: true`` sets ``swap_cancel_requested``; the execution then
kills the new replicas and keeps the old ones.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from botocore.exceptions import ClientError

from chalicelib import (
    aws,
    candidates,
    dynamo,
    executions,
    jobs,
    lifecycle,
    providers,
    replicas,
)
from chalicelib.config import Settings
from chalicelib.errors import Conflict, InvalidRequest
from chalicelib.states import JOB_ACCEPTS_WORK, REPLICA_TERMINAL, ReplicaPhase

logger = logging.getLogger(__name__)

RUNNING_STATES = ("starting", "running", "draining")
FINISHED_STATES = ("done", "cancelled", "failed")
# Phases of replicas that a swap replaces.
SWAPPABLE = frozenset(
    {
        ReplicaPhase.REGISTERED,
        ReplicaPhase.LAUNCHING,
        ReplicaPhase.LOADING_MODEL,
        ReplicaPhase.MODEL_READY,
        ReplicaPhase.RUNNING,
        ReplicaPhase.DEAD,
    }
)


class SwapCancelled(Exception):
    """The swap was cancelled before the old replicas were drained."""


def _job_key(job_id: str) -> dict[str, Any]:
    return {"job_id": {"S": job_id}}


def _update_job(
    settings: Settings,
    job_id: str,
    expression: str,
    values: dict[str, Any],
    condition: str | None = None,
    names: dict[str, str] | None = None,
) -> bool:
    arguments: dict[str, Any] = {
        "TableName": settings.jobs_table,
        "Key": _job_key(job_id),
        "UpdateExpression": expression,
        "ExpressionAttributeValues": dynamo.serialize(values),
    }
    if condition:
        arguments["ConditionExpression"] = condition
    if names:
        arguments["ExpressionAttributeNames"] = names
    try:
        aws.client("dynamodb").update_item(**arguments)
    except ClientError as error:
        if dynamo.is_condition_failure(error):
            return False
        raise
    return True


def _claim(settings: Settings, job_id: str, record: dict[str, Any]) -> None:
    values: dict[str, Any] = {":starting": "starting", ":swap": record, ":now": time.time()}
    finished = []
    for i, state in enumerate(FINISHED_STATES):
        values[f":f{i}"] = state
        finished.append(f":f{i}")
    accepting = []
    for i, status in enumerate(sorted(JOB_ACCEPTS_WORK)):
        values[f":ok{i}"] = status.value
        accepting.append(f":ok{i}")
    claimed = _update_job(
        settings,
        job_id,
        "SET swap_state = :starting, swap = :swap, updated_at = :now REMOVE swap_cancel_requested",
        values,
        f"#status IN ({', '.join(accepting)}) AND (attribute_not_exists(swap_state) "
        f"OR swap_state IN ({', '.join(finished)}))",
        {"#status": "status"},
    )
    if claimed:
        return
    job = jobs.get_job(settings, job_id)
    if job.get("swap_state") in RUNNING_STATES:
        raise Conflict(
            f"a swap of job {job_id!r} is already {job['swap_state']} (version "
            f"{(job.get('swap') or {}).get('version')}); wait for it or cancel it with "
            "cancel: true",
            swap_state=job["swap_state"],
        )
    raise Conflict(
        f"job {job_id!r} is {job['status']!r} and cannot swap replicas", job_status=job["status"]
    )


def start_swap(
    settings: Settings,
    job_id: str,
    *,
    overrides: dict[str, Any],
    num_replicas: int | None,
    ready_threshold: int | None,
    on_demand: bool | None,
    force: bool,
) -> dict[str, Any]:
    """Registers the new replicas and starts the swap execution; returns the swap."""
    provider = providers.default_name()
    if provider == "external":
        raise InvalidRequest(
            "swap launches replicas through the stage's provider, and this stage uses the "
            "external provider; add your replicas with scale and remove the old ones with kill"
        )

    job = jobs.get_job(settings, job_id)
    existing = replicas.list_replicas(settings, job_id)
    old = [r for r in existing if ReplicaPhase(r["phase"]) in SWAPPABLE]
    if not old and not force:
        raise Conflict(
            f"job {job_id!r} has no running replica to swap out; add replicas with scale, or "
            "send force: true"
        )
    count = num_replicas or len(old) or 1
    threshold = ready_threshold if ready_threshold is not None else count
    if threshold > count:
        raise InvalidRequest(
            f"ready_threshold {threshold} is more than num_replicas {count}; use 1 to {count}",
            field="ready_threshold",
        )

    ranked = candidates.for_new_replicas(job, existing, overrides, on_demand=on_demand)
    current = candidates.current_placement(existing) or {}
    if not force and ranked and _same_shape(ranked[0], current) and count == len(old):
        raise Conflict(
            "the new replicas would run the placement the job already runs "
            f"({current.get('gpu_type')}, tp {current.get('tp_size')}, pp "
            f"{current.get('pp_size')}); change gpu_type, tp_size, pp_size or num_replicas, or "
            "send force: true"
        )

    old_ids = sorted(r["replica_id"] for r in old)
    record = {"old_replicas": old_ids, "ready_threshold": threshold, "started_at": time.time()}
    _claim(settings, job_id, record)
    try:
        registered = replicas.register_replicas(
            settings, job_id, count, provider=provider, config=lifecycle.replica_config(ranked)
        )
    except Exception as error:
        _finish(settings, job_id, None, "failed", f"new replicas could not be registered: {error}")
        raise

    version = registered["version"]
    new_ids = [entry["replica_id"] for entry in registered["replicas"]]
    _update_job(
        settings,
        job_id,
        "SET swap_state = :running, swap.version = :version, swap.new_replicas = :new",
        {":running": "running", ":version": version, ":new": new_ids},
    )

    settings_lifecycle = lifecycle.load_lifecycle_settings()
    executions.start(
        "swap",
        executions.execution_name(job_id, f"v{version}", "swap"),
        {
            "job_id": job_id,
            "version": version,
            "poll_seconds": settings_lifecycle.swap_poll_seconds,
            "drain_seconds": settings_lifecycle.drain_seconds,
        },
    )
    logger.info(
        "swap started",
        extra={"job_id": job_id, "version": version, "old": old_ids, "new": new_ids},
    )
    return {
        "status": "swapping",
        "old_replicas": old_ids,
        "new_replicas": new_ids,
        "ready_threshold": threshold,
        "version": version,
    }


def _same_shape(candidate: dict[str, Any], current: dict[str, Any]) -> bool:
    if not current:
        return False
    return all(
        (candidate.get(key) or None) == (current.get(key) or None)
        for key in ("gpu_type", "tp_size", "pp_size")
    )


def request_cancel(settings: Settings, job_id: str) -> dict[str, Any]:
    """Asks the running swap to stop, so that it kills the new replicas and keeps the old ones."""
    cancelled = _update_job(
        settings,
        job_id,
        "SET swap_cancel_requested = :yes, updated_at = :now",
        {":yes": True, ":now": time.time(), ":running": "running", ":starting": "starting"},
        "swap_state IN (:running, :starting)",
    )
    job = jobs.get_job(settings, job_id)
    swap = job.get("swap") or {}
    if not cancelled:
        state = job.get("swap_state")
        if state == "draining":
            message = "the swap is already draining the old replicas and can no longer be cancelled"
        else:
            message = f"job {job_id!r} has no swap in progress (last swap: {state or 'none'})"
        raise Conflict(message, swap_state=state)
    return {
        "status": "cancelling",
        "old_replicas": swap.get("old_replicas", []),
        "new_replicas": swap.get("new_replicas", []),
        "ready_threshold": swap.get("ready_threshold"),
        "version": swap.get("version"),
    }


def _finish(settings: Settings, job_id: str, version: int | None, state: str, reason: str) -> None:
    values = {":state": state, ":reason": reason[:2000], ":now": time.time()}
    condition = None
    if version is not None:
        values[":version"] = version
        condition = "swap.version = :version"
    _update_job(
        settings,
        job_id,
        "SET swap_state = :state, swap.outcome = :reason, swap.finished_at = :now",
        values,
        condition,
    )
    logger.info("swap finished", extra={"job_id": job_id, "state": state, "reason": reason})


def _swap_of(settings: Settings, event: dict[str, Any]) -> tuple[dict, dict]:
    job = jobs.get_job(settings, event["job_id"])
    swap = job.get("swap") or {}
    if int(swap.get("version", -1)) != int(event["version"]):
        raise Conflict(
            f"job {event['job_id']} runs swap version {swap.get('version')}, not {event['version']}"
        )
    return job, swap


@lifecycle.task("check_swap")
def check_swap(settings: Settings, event: dict[str, Any]) -> dict[str, Any]:
    """Returns ``state``: waiting, ready, cancelled, failed or job_ended."""
    job, swap = _swap_of(settings, event)
    if job.get("swap_cancel_requested"):
        return {"state": "cancelled"}
    if lifecycle.job_is_over(job) or jobs.progress_of(job)["all_done"]:
        return {"state": "job_ended"}
    new_ids = set(swap.get("new_replicas") or [])
    threshold = int(swap.get("ready_threshold", 1))
    new = [r for r in replicas.list_replicas(settings, job["job_id"]) if r["replica_id"] in new_ids]
    ready = [r for r in new if int(r.get("chunks_completed", 0)) >= 1]
    if len(ready) >= threshold:
        return {"state": "ready", "ready": len(ready)}
    possible = [r for r in new if ReplicaPhase(r["phase"]) not in REPLICA_TERMINAL]
    if len(possible) < threshold:
        return {
            "state": "failed",
            "reason": f"only {len(possible)} of the new replicas are still starting or running, "
            f"fewer than ready_threshold {threshold}",
        }
    return {"state": "waiting", "ready": len(ready)}


@lifecycle.task("drain_old")
def drain_old(settings: Settings, event: dict[str, Any]) -> dict[str, Any]:
    """Moves the old replicas to draining; old replicas that never started end at once."""
    job_id = event["job_id"]
    _, swap = _swap_of(settings, event)
    drained = _update_job(
        settings,
        job_id,
        "SET swap_state = :draining",
        {":draining": "draining", ":running": "running", ":yes": True, ":version": swap["version"]},
        "swap_state = :running AND swap.version = :version AND "
        "(attribute_not_exists(swap_cancel_requested) OR swap_cancel_requested <> :yes)",
    )
    if not drained:
        raise SwapCancelled(f"swap version {swap['version']} of job {job_id} was cancelled")
    reason = f"swapped out by swap version {swap['version']}"
    draining = []
    for replica_id in swap.get("old_replicas") or []:
        replica = replicas.get_replica(settings, job_id, replica_id)
        if replica is None or replicas.is_terminal(replica["phase"]):
            continue
        if ReplicaPhase(replica["phase"]) in lifecycle.STARTING:
            lifecycle.stop_replica(settings, replica, ReplicaPhase.SWAPPED_OUT, reason)
            continue
        try:
            replicas.transition_replica(
                settings, job_id, replica_id, ReplicaPhase.DRAINING, reason=reason
            )
            draining.append(replica_id)
        except Conflict as error:
            logger.info(
                "old replica not drained", extra={"replica_id": replica_id, "error": error.message}
            )
    return {"draining": draining}


@lifecycle.task("retire_old")
def retire_old(settings: Settings, event: dict[str, Any]) -> dict[str, Any]:
    """Returns the old replicas' leases, terminates them and marks them swapped_out."""
    job_id = event["job_id"]
    _, swap = _swap_of(settings, event)
    reason = f"swapped out by swap version {swap['version']}"
    retired = []
    for replica_id in swap.get("old_replicas") or []:
        replica = replicas.get_replica(settings, job_id, replica_id)
        if replica is None:
            continue
        if lifecycle.stop_replica(settings, replica, ReplicaPhase.SWAPPED_OUT, reason):
            retired.append(replica_id)
        else:
            provider = providers.get(replica.get("provider", "external"))
            if provider is not None:
                provider.terminate(job_id, replica_id)
    _finish(settings, job_id, swap["version"], "done", "old replicas swapped out")
    return {"swapped_out": retired}


def _kill_new(settings: Settings, job_id: str, swap: dict[str, Any], reason: str) -> list[str]:
    killed = []
    for replica_id in swap.get("new_replicas") or []:
        replica = replicas.get_replica(settings, job_id, replica_id)
        if replica is not None and lifecycle.stop_replica(
            settings, replica, ReplicaPhase.KILLED, reason
        ):
            killed.append(replica_id)
    return killed


@lifecycle.task("cancel_swap")
def cancel_swap(settings: Settings, event: dict[str, Any]) -> dict[str, Any]:
    job_id = event["job_id"]
    _, swap = _swap_of(settings, event)
    killed = _kill_new(settings, job_id, swap, f"swap version {swap['version']} cancelled")
    _finish(settings, job_id, swap["version"], "cancelled", "cancelled by the user")
    return {"killed": killed}


@lifecycle.task("abort_swap")
def abort_swap(settings: Settings, event: dict[str, Any]) -> dict[str, Any]:
    job_id = event["job_id"]
    _, swap = _swap_of(settings, event)
    check = event.get("check") or {}
    reason = str(check.get("reason") or f"swap check returned {check.get('state')!r}")
    killed = _kill_new(settings, job_id, swap, f"swap version {swap['version']} failed: {reason}")
    _finish(settings, job_id, swap["version"], "failed", reason)
    return {"killed": killed}


@lifecycle.task("finish_swap")
def finish_swap(settings: Settings, event: dict[str, Any]) -> dict[str, Any]:
    job_id = event["job_id"]
    _, swap = _swap_of(settings, event)
    _finish(settings, job_id, swap["version"], "done", "the job ended before the swap finished")
    return {"state": "done"}
