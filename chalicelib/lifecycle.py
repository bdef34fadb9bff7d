"""Replica lifecycle: launch through the scale and launch state machines, readiness, stopping.

A scale execution (``<job>-v<N>-scale``) starts one launch execution per new replica
(``<replica>-launch``). The launch execution tries the replica's placement candidates in order
(``chalicelib/candidates.py``). ``launch_candidate`` moves past candidates without capacity or
quota and starts the first one that has it. ``await_ready`` stores a task token on the replica
item, and the execution waits, with a heartbeat timeout and an overall timeout, until the
replica reports ``model_ready`` and ``on_ready`` sends the token back. A replica that times out,
fails to start or is interrupted first is terminated and the next candidate is tried
(``abandon_candidate``). When no candidate is left the replica is ``failed`` (``fail_replica``),
and so is the job when none of its replicas is left.

Every attempt issues a new replica token: only the hash is stored, so an instance of an
abandoned attempt cannot report for the replica. The state machines call one Lambda function,
``lifecycle_task``, with ``{"task": NAME, ...ids}``; ``run_task`` dispatches on the name, and the
class name of a raised error is the error name the state machines catch.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from chalicelib import aws, candidates, dynamo, events, executions, jobs, providers, replicas
from chalicelib.config import Settings, load_settings
from chalicelib.errors import Conflict, InvalidRequest, NotFound
from chalicelib.states import (
    JOB_ACCEPTS_WORK,
    JOB_TERMINAL,
    REPLICA_TERMINAL,
    JobStatus,
    ReplicaPhase,
    replica_sources_for,
)

logger = logging.getLogger(__name__)

STARTING = (ReplicaPhase.REGISTERED, ReplicaPhase.LAUNCHING, ReplicaPhase.LOADING_MODEL)
READY = (ReplicaPhase.MODEL_READY, ReplicaPhase.RUNNING)
# Phases whose sidecar should stop pulling and drain: the heartbeat response asks it to.
STOP_PULLING = frozenset(
    {
        ReplicaPhase.DRAINING,
        ReplicaPhase.PREEMPTING,
        ReplicaPhase.COMPLETED,
        ReplicaPhase.FAILED,
        ReplicaPhase.KILLED,
        ReplicaPhase.SWAPPED_OUT,
    }
)
# An attempt record keeps this many characters of a provider's error message.
MAX_REASON_CHARS = 500


class ReplicaStopped(Exception):
    """The replica was killed, swapped out or finished while its launch was in progress."""


class ReplicaStartupFailed(Exception):
    """The replica's sidecar reported ``startup_failed`` (sent through the task token)."""


class ReplicaPreempted(Exception):
    """The replica's spot instance was interrupted before the replica was ready."""


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw else default


@dataclass(frozen=True)
class LifecycleSettings:
    # A replica must report model_ready within this many seconds of its launch (model download
    # and load included), and send a heartbeat at least this often while it starts.
    ready_timeout_seconds: int
    ready_heartbeat_seconds: int
    # Seconds between checks of a running swap, and that old replicas get to finish their
    # chunks after a swap drains them.
    swap_poll_seconds: int
    drain_seconds: int
    # A replica whose last heartbeat (server time) is older than this is marked dead.
    dead_after_seconds: int


def load_lifecycle_settings() -> LifecycleSettings:
    return LifecycleSettings(
        ready_timeout_seconds=_int_env("TANDEMN_READY_TIMEOUT_SECONDS", 2700),
        ready_heartbeat_seconds=_int_env("TANDEMN_READY_HEARTBEAT_SECONDS", 600),
        swap_poll_seconds=_int_env("TANDEMN_SWAP_POLL_SECONDS", 30),
        drain_seconds=_int_env("TANDEMN_DRAIN_SECONDS", 120),
        dead_after_seconds=_int_env("TANDEMN_DEAD_AFTER_SECONDS", 90),
    )


# Task registry of the ``lifecycle_task`` Lambda function.

_tasks: dict[str, Callable[[Settings, dict[str, Any]], dict[str, Any]]] = {}


def task(name: str) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., dict[str, Any]]]:
    def register(function: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        _tasks[name] = function
        return function

    return register


def run_task(event: dict[str, Any]) -> dict[str, Any]:
    """Runs the state machine task named in ``event["task"]`` and returns its result."""
    name = event.get("task")
    if name not in _tasks:
        raise InvalidRequest(f"unknown lifecycle task {name!r}; known: {sorted(_tasks)}")
    ids = {k: event[k] for k in ("job_id", "replica_id", "version") if k in event}
    logger.info("lifecycle task started", extra={"task": name, **ids})
    result = _tasks[name](load_settings(), event)
    logger.info("lifecycle task finished", extra={"task": name, **ids, "result": result})
    return result


# Replica items.


def _replica_key(job_id: str, replica_id: str) -> dict[str, Any]:
    return {"job_id": {"S": job_id}, "replica_id": {"S": replica_id}}


def _require_replica(settings: Settings, job_id: str, replica_id: str) -> dict[str, Any]:
    replica = replicas.get_replica(settings, job_id, replica_id)
    if replica is None:
        raise NotFound(f"replica {replica_id!r} of job {job_id!r} not found")
    return replica


def _phase_condition(phases: Any, prefix: str) -> tuple[str, dict[str, Any]]:
    values = {f":{prefix}{i}": ReplicaPhase(phase).value for i, phase in enumerate(phases)}
    return "phase IN (" + ", ".join(values) + ")", values


def _update_replica(
    settings: Settings,
    job_id: str,
    replica_id: str,
    expression: str,
    values: dict[str, Any],
    condition: str | None = None,
) -> bool:
    """Runs one UpdateItem on a replica; returns False when ``condition`` failed."""
    arguments: dict[str, Any] = {
        "TableName": settings.replicas_table,
        "Key": _replica_key(job_id, replica_id),
        "UpdateExpression": expression,
    }
    if values:
        arguments["ExpressionAttributeValues"] = dynamo.serialize(values)
    if condition:
        arguments["ConditionExpression"] = condition
    try:
        aws.client("dynamodb").update_item(**arguments)
    except ClientError as error:
        if dynamo.is_condition_failure(error):
            return False
        raise
    return True


def _attempt_record(attempt: int, index: int, candidate: dict[str, Any], **fields: Any) -> dict:
    record: dict[str, Any] = {"attempt": attempt, "candidate_index": index, "at": time.time()}
    record.update({k: v for k, v in candidate.items() if v is not None})
    record.update({k: v for k, v in fields.items() if v is not None})
    return record


def _append_attempt(settings: Settings, job_id: str, replica_id: str, record: dict) -> None:
    _update_replica(
        settings,
        job_id,
        replica_id,
        "SET launch_attempts = list_append(if_not_exists(launch_attempts, :empty), :record), "
        "updated_at = :now",
        {":empty": [], ":record": [record], ":now": time.time()},
    )
    events.launch_attempt_recorded(settings, job_id, replica_id, record)


# Model length of the engine.

DEFAULT_MAX_MODEL_LEN = 8192


def max_model_len_for(job: dict[str, Any]) -> int:
    """Returns the engine's ``--max-model-len``: the longest prompt plus the output cap.

    Rounded up to a multiple of 1024, with 10 % headroom because the input token counts of
    validation are estimates; 8192 when the job has no statistics.
    """
    stats = job.get("input_stats") or {}
    longest_prompt = int(stats.get("max_input_tokens") or 0)
    if longest_prompt <= 0:
        return DEFAULT_MAX_MODEL_LEN
    requested = job.get("requested") or {}
    output = int(
        requested.get("max_output_tokens")
        or stats.get("max_requested_output_tokens")
        or requested.get("avg_output_tokens")
        or 1024
    )
    needed = math.ceil((longest_prompt + output) * 1.1)
    return max(2048, math.ceil(needed / 1024) * 1024)


def launch_config(settings: Settings, job: dict[str, Any], candidate: dict[str, Any]) -> dict:
    """Everything a provider needs to start one replica on ``candidate``."""
    return {
        **candidate,
        "model_name": job.get("model_name"),
        "max_model_len": int(
            candidate.get("max_model_len") or job.get("max_model_len") or max_model_len_for(job)
        ),
        "input_bucket": job.get("input_bucket"),
        "input_key": job.get("input_key"),
        "output_bucket": settings.bucket,
        "output_prefix": jobs.output_prefix(settings, job["job_id"]),
        "persist": bool((job.get("requested") or {}).get("persist")),
        "ready_timeout_seconds": load_lifecycle_settings().ready_timeout_seconds,
    }


# Scale: register replicas and start their launches.


def default_candidates(job: dict[str, Any]) -> list[dict[str, Any]]:
    on_demand = True if (job.get("requested") or {}).get("on_demand") else None
    return candidates.expand(candidates.ranked_placements(job), on_demand=on_demand)


def start_scale(settings: Settings, job_id: str, version: int, replica_ids: list[str]) -> str:
    """Starts the scale execution of one replica version; a second call for it does nothing."""
    arn, _ = executions.start(
        "scale",
        executions.execution_name(job_id, f"v{version}", "scale"),
        {"job_id": job_id, "version": version, "replica_ids": replica_ids},
    )
    return arn


def scale(
    settings: Settings,
    job_id: str,
    count: int,
    *,
    provider: str,
    overrides: dict[str, Any],
    on_demand: bool | None,
    force: bool,
) -> dict[str, Any]:
    """Adds ``count`` replicas that the provider launches; returns their ids and version.

    Placement fields missing from ``overrides`` are inherited from the job's current replicas.
    Without ``force`` a job with no pending chunk takes no new replicas, since they would idle.
    """
    job = jobs.get_job(settings, job_id)
    progress = jobs.progress_of(job)
    accepting = job["status"] in {s.value for s in JOB_ACCEPTS_WORK}
    if not force and accepting and progress["total"] and progress["pending"] == 0:
        raise Conflict(
            f"job {job_id!r} has no pending chunk, so new replicas would have nothing to do; "
            "send force: true to add them anyway",
            job_status=job["status"],
        )
    existing = replicas.list_replicas(settings, job_id)
    ranked = candidates.for_new_replicas(job, existing, overrides, on_demand=on_demand)
    registered = replicas.register_replicas(
        settings, job_id, count, provider=provider, config=replica_config(ranked)
    )
    return {
        "status": "scaling",
        "provider": provider,
        "version": registered["version"],
        "new_replicas": [entry["replica_id"] for entry in registered["replicas"]],
    }


def replica_config(ranked: list[dict[str, Any]]) -> dict[str, Any]:
    """Returns a replica item's placement fields: the first candidate's shape and the list."""
    first = ranked[0] if ranked else {}
    return {
        "gpu_type": first.get("gpu_type"),
        "tp_size": first.get("tp_size"),
        "pp_size": first.get("pp_size"),
        "candidates": ranked,
        "candidate_index": 0,
    }


def replica_config_for(job: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Adds the candidate list to a registration that came without one (the first replicas)."""
    if config.get("candidates"):
        return config
    requested = {k: config.get(k) for k in ("gpu_type", "tp_size", "pp_size")}
    if any(value is not None for value in requested.values()):
        on_demand = None
        if config.get("market") is not None:
            on_demand = config["market"] == "on_demand"
        ranked = candidates.for_new_replicas(job, [], requested, on_demand=on_demand)
    else:
        ranked = default_candidates(job)
    merged = {**config, **replica_config(ranked)}
    merged.pop("market", None)
    return merged


@task("start_launch")
def start_launch_task(settings: Settings, event: dict[str, Any]) -> dict[str, Any]:
    lifecycle = load_lifecycle_settings()
    replica_id = event["replica_id"]
    arn, started = executions.start(
        "launch",
        executions.execution_name(replica_id, "launch"),
        {
            "job_id": event["job_id"],
            "replica_id": replica_id,
            "ready_timeout_seconds": lifecycle.ready_timeout_seconds,
            "heartbeat_seconds": lifecycle.ready_heartbeat_seconds,
        },
    )
    return {"execution_arn": arn, "started": started}


# Launch: try candidates until one has capacity.


def _claim_attempt(
    settings: Settings,
    replica: dict[str, Any],
    index: int,
    attempt: int,
    token: str,
    candidate: dict[str, Any],
) -> None:
    """Moves the replica to ``launching`` on candidate ``index`` with a new token hash.

    The condition on ``launch_attempt`` stops two copies of the same task (a retried Lambda
    invocation) from both launching an instance.
    """
    condition, values = _phase_condition(replica_sources_for(ReplicaPhase.LAUNCHING), "src")
    previous = int(replica.get("launch_attempt", 0))
    values.update(
        {
            ":launching": ReplicaPhase.LAUNCHING.value,
            ":hash": replicas.hash_token(token),
            ":index": index,
            ":attempt": attempt,
            ":previous": previous,
            ":now": time.time(),
            ":gpu": candidate.get("gpu_type") or "",
            ":tp": int(candidate.get("tp_size") or 1),
            ":pp": int(candidate.get("pp_size") or 1),
            ":market": candidate.get("market") or "",
            ":region": candidate.get("region") or "",
        }
    )
    expression = (
        "SET phase = :launching, token_hash = :hash, candidate_index = :index, "
        "launch_attempt = :attempt, updated_at = :now, gpu_type = :gpu, tp_size = :tp, "
        "pp_size = :pp, market = :market, #region = :region "
        "REMOVE launch_task_token, instance_id, instance_type"
    )
    condition += " AND (attribute_not_exists(launch_attempt) OR launch_attempt = :previous)"
    try:
        aws.client("dynamodb").update_item(
            TableName=settings.replicas_table,
            Key=_replica_key(replica["job_id"], replica["replica_id"]),
            UpdateExpression=expression,
            ConditionExpression=condition,
            ExpressionAttributeNames={"#region": "region"},
            ExpressionAttributeValues=dynamo.serialize(values),
        )
    except ClientError as error:
        if not dynamo.is_condition_failure(error):
            raise
        current = replicas.get_replica(settings, replica["job_id"], replica["replica_id"]) or {}
        raise ReplicaStopped(
            f"replica {replica['replica_id']} changed while launching (now "
            f"{current.get('phase')!r}, attempt {current.get('launch_attempt')})"
        ) from error


def _record_launched(
    settings: Settings, job_id: str, replica_id: str, attempt: int, launched: dict[str, Any]
) -> None:
    fields = {k: v for k, v in launched.items() if k in ("instance_id", "instance_type", "region")}
    # A retried launch_candidate reads launched_attempt to see that this attempt launched already.
    fields["launched_attempt"] = attempt
    names = {f"#f{i}": name for i, name in enumerate(fields)}
    values: dict[str, Any] = {f":f{i}": value for i, value in enumerate(fields.values())}
    values[":attempt"] = attempt
    sets = ", ".join(f"#f{i} = :f{i}" for i in range(len(fields)))
    aws.client("dynamodb").update_item(
        TableName=settings.replicas_table,
        Key=_replica_key(job_id, replica_id),
        UpdateExpression=f"SET {sets}",
        ConditionExpression="launch_attempt = :attempt",
        ExpressionAttributeNames=names,
        ExpressionAttributeValues=dynamo.serialize(values),
    )


def _end_replica_of_finished_job(
    settings: Settings, job: dict[str, Any], replica: dict[str, Any]
) -> dict[str, Any]:
    try:
        replicas.transition_replica(
            settings,
            job["job_id"],
            replica["replica_id"],
            ReplicaPhase.COMPLETED,
            reason=f"job is {job['status']}; the replica was not started",
        )
    except Conflict:
        pass
    return {"outcome": "stopped", "reason": f"job is {job['status']}"}


@task("launch_candidate")
def launch_candidate(settings: Settings, event: dict[str, Any]) -> dict[str, Any]:
    """Launches the replica on the first candidate, from its current one on, that has capacity.

    Returns ``outcome`` ``launched``, ``exhausted`` (no candidate left) or ``stopped`` (the
    replica or its job ended meanwhile).
    """
    job_id, replica_id = event["job_id"], event["replica_id"]
    replica = _require_replica(settings, job_id, replica_id)
    if ReplicaPhase(replica["phase"]) not in STARTING:
        return {"outcome": "stopped", "reason": f"replica is {replica['phase']}"}
    job = jobs.get_job(settings, job_id)
    if job["status"] not in {s.value for s in JOB_ACCEPTS_WORK}:
        return _end_replica_of_finished_job(settings, job, replica)
    provider = providers.get(replica.get("provider", "external"))
    ranked = replica.get("candidates") or [{}]
    index = int(replica.get("candidate_index", 0))
    attempt = int(replica.get("launch_attempt", 0))
    if attempt and replica.get("launched_attempt") == attempt:
        # Step Functions retries this task on Lambda service errors, which can come after the
        # first invocation launched. Launching again would start a second instance and revoke
        # the first one's token. abandon_candidate clears launched_attempt before the next launch.
        logger.info(
            "launch task repeated, the attempt launched already",
            extra={"job_id": job_id, "replica_id": replica_id, "attempt": attempt},
        )
        return {"outcome": "launched", "candidate_index": index, "attempt": attempt}
    recorded = {int(r.get("attempt", 0)) for r in replica.get("launch_attempts") or []}
    if attempt and attempt not in recorded and provider is not None:
        # An earlier invocation claimed this attempt and stopped before it recorded an outcome,
        # perhaps after its instance started. That instance is terminated before the next launch,
        # so the crash does not leave the replica with two instances.
        logger.warning(
            "launch task repeated after an unfinished attempt, terminating what it started",
            extra={"job_id": job_id, "replica_id": replica_id, "attempt": attempt},
        )
        provider.terminate(job_id, replica_id)
    while index < len(ranked):
        candidate = ranked[index]
        attempt += 1
        token = replicas.new_token(replica_id)
        _claim_attempt(settings, replica, index, attempt, token, candidate)
        replica["launch_attempt"] = attempt
        if provider is None:
            reason = f"provider {replica.get('provider')!r} is not available in this deployment"
            record = _attempt_record(attempt, index, candidate, outcome="failed", reason=reason)
            _append_attempt(settings, job_id, replica_id, record)
            return {"outcome": "exhausted", "reason": reason}
        config = launch_config(settings, job, candidate)
        try:
            launched = provider.launch(job_id, replica_id, token, config) or {}
        except providers.CapacityUnavailable as error:
            outcome, reason = "no_capacity", str(error)
        except providers.InstanceProfileNotReady:
            raise
        except Exception as error:
            # Any other launch failure (a bad parameter, a broken image) moves on as well.
            logger.exception(
                "replica launch failed",
                extra={"job_id": job_id, "replica_id": replica_id, "attempt": attempt},
            )
            provider.terminate(job_id, replica_id)
            outcome, reason = "failed", f"launch failed: {type(error).__name__}: {error}"
        else:
            _record_launched(settings, job_id, replica_id, attempt, launched)
            record = _attempt_record(
                attempt,
                index,
                candidate,
                outcome="launched",
                instance_id=launched.get("instance_id"),
            )
            _append_attempt(settings, job_id, replica_id, record)
            logger.info(
                "replica launched",
                extra={
                    "job_id": job_id,
                    "replica_id": replica_id,
                    "attempt": attempt,
                    "candidate": candidate,
                    **launched,
                },
            )
            return {"outcome": "launched", "candidate_index": index, "attempt": attempt}
        logger.warning(
            "placement candidate unavailable, trying the next one",
            extra={
                "job_id": job_id,
                "replica_id": replica_id,
                "candidate": candidate,
                "reason": reason,
            },
        )
        record = _attempt_record(
            attempt, index, candidate, outcome=outcome, reason=reason[:MAX_REASON_CHARS]
        )
        _append_attempt(settings, job_id, replica_id, record)
        index += 1
    return {"outcome": "exhausted"}


@task("await_ready")
def await_ready(settings: Settings, event: dict[str, Any]) -> dict[str, Any]:
    """Stores the launch task token on the replica; ``on_ready`` sends it back.

    A replica that became ready before the token was stored gets its token sent back here. The
    condition on the phase orders this write against the phase change, so one of the two sees
    the other.
    """
    job_id, replica_id, token = event["job_id"], event["replica_id"], event["task_token"]
    condition, values = _phase_condition(STARTING, "st")
    values.update({":token": token, ":now": time.time()})
    stored = _update_replica(
        settings,
        job_id,
        replica_id,
        "SET launch_task_token = :token, updated_at = :now",
        values,
        condition,
    )
    if stored:
        return {"waiting": True}
    replica = _require_replica(settings, job_id, replica_id)
    phase = ReplicaPhase(replica["phase"])
    if phase in READY:
        executions.task_success(token, {"replica_id": replica_id, "phase": phase.value})
        return {"waiting": False, "phase": phase.value}
    raise ReplicaStopped(f"replica {replica_id} is {phase.value}; it will not become ready")


def _take_token(settings: Settings, job_id: str, replica_id: str) -> str | None:
    """Removes and returns the replica's launch task token, if it has one."""
    replica = replicas.get_replica(settings, job_id, replica_id)
    token = (replica or {}).get("launch_task_token")
    if not token:
        return None
    removed = _update_replica(
        settings,
        job_id,
        replica_id,
        "REMOVE launch_task_token",
        {":token": token},
        "launch_task_token = :token",
    )
    return token if removed else None


def on_ready(settings: Settings, job_id: str, replica_id: str) -> None:
    """Ends the replica's launch wait: called after it moved to model_ready or running."""
    token = _take_token(settings, job_id, replica_id)
    if token:
        executions.task_success(token, {"replica_id": replica_id, "phase": "model_ready"})


def on_startup_failed(settings: Settings, job_id: str, replica_id: str, reason: str) -> bool:
    """Hands a startup failure to the launch execution; False when none waits for the replica.

    The replica keeps the reported reason as ``phase_reason`` while it moves to its next
    candidate.
    """
    token = _take_token(settings, job_id, replica_id)
    if not token:
        return False
    reason = reason or "startup failed"
    _update_replica(
        settings,
        job_id,
        replica_id,
        "SET phase_reason = :reason, updated_at = :now",
        {":reason": f"startup failed: {reason}"[:MAX_REASON_CHARS], ":now": time.time()},
    )
    executions.task_failure(token, "ReplicaStartupFailed", reason)
    return True


def on_stopped(settings: Settings, job_id: str, replica_id: str, reason: str) -> None:
    """Ends the launch wait of a replica that was killed or swapped out while starting."""
    token = _take_token(settings, job_id, replica_id)
    if token:
        executions.task_failure(token, "ReplicaStopped", reason)


def on_preempted_while_starting(
    settings: Settings, job_id: str, replica_id: str, reason: str
) -> bool:
    token = _take_token(settings, job_id, replica_id)
    if not token:
        return False
    executions.task_failure(token, "ReplicaPreempted", reason)
    return True


def record_heartbeat(settings: Settings, job_id: str, replica_id: str) -> dict[str, Any]:
    """Writes the replica's heartbeat (server time) and tells the sidecar whether to go on.

    A starting replica's heartbeat also extends its launch wait; a replica marked dead that
    sends one again is running again.
    """
    now = time.time()
    try:
        response = aws.client("dynamodb").update_item(
            TableName=settings.replicas_table,
            Key=_replica_key(job_id, replica_id),
            UpdateExpression="SET last_heartbeat = :now",
            ConditionExpression="attribute_exists(replica_id)",
            ExpressionAttributeValues=dynamo.serialize({":now": now}),
            ReturnValues="ALL_NEW",
        )
    except ClientError as error:
        if dynamo.is_condition_failure(error):
            raise NotFound(f"replica {replica_id!r} of job {job_id!r} not found") from error
        raise
    replica = dynamo.deserialize(response["Attributes"]) or {}
    phase = ReplicaPhase(replica["phase"])
    if phase == ReplicaPhase.DEAD:
        try:
            replicas.transition_replica(
                settings, job_id, replica_id, ReplicaPhase.RUNNING, reason="heartbeat resumed"
            )
            phase = ReplicaPhase.RUNNING
        except Conflict:
            pass
    token = replica.get("launch_task_token")
    if token and phase in STARTING:
        executions.task_heartbeat(token)
    action = "drain" if phase in STOP_PULLING else "continue"
    return {"phase": phase.value, "action": action, "server_time": now}


@task("abandon_candidate")
def abandon_candidate(settings: Settings, event: dict[str, Any]) -> dict[str, Any]:
    """Terminates an attempt that did not become ready and moves to the next candidate."""
    job_id, replica_id = event["job_id"], event["replica_id"]
    error = event.get("error") or "unknown"
    cause = str(event.get("cause") or "")
    replica = _require_replica(settings, job_id, replica_id)
    index = int(replica.get("candidate_index", 0))
    attempt = int(replica.get("launch_attempt", 0))
    if attempt and replica.get("abandoned_attempt") == attempt:
        # The first invocation moved on already, so moving again would skip a candidate.
        logger.info(
            "abandon task repeated, the attempt was abandoned already",
            extra={"job_id": job_id, "replica_id": replica_id, "attempt": attempt},
        )
        return {"candidate_index": index, "reason": replica.get("abandon_reason", "")}
    provider = providers.get(replica.get("provider", "external"))
    if provider is not None:
        provider.terminate(job_id, replica_id)
    lifecycle = load_lifecycle_settings()
    reasons = {
        "States.Timeout": "did not report model_ready within "
        f"{lifecycle.ready_timeout_seconds} s of its launch",
        "States.HeartbeatTimeout": "sent no heartbeat for "
        f"{lifecycle.ready_heartbeat_seconds} s while starting",
        "ReplicaStartupFailed": f"startup failed: {cause}",
        "ReplicaPreempted": f"spot instance interrupted before it was ready: {cause}",
    }
    reason = reasons.get(error, f"{error}: {cause}")[:MAX_REASON_CHARS]
    ranked = replica.get("candidates") or [{}]
    candidate = ranked[index] if index < len(ranked) else {}
    record = _attempt_record(attempt, index, candidate, outcome="abandoned", reason=reason)
    condition, values = _phase_condition(STARTING, "st")
    values.update(
        {
            ":next": index + 1,
            ":attempt": attempt,
            ":now": time.time(),
            ":reason": reason,
            ":empty": [],
            ":record": [record],
        }
    )
    # The attempt record is appended in the same conditional write as the move, so a replica
    # that changed meanwhile, or a repeated task, gets no record of an abandon that did not happen.
    moved = _update_replica(
        settings,
        job_id,
        replica_id,
        "SET candidate_index = :next, updated_at = :now, abandoned_attempt = :attempt, "
        "abandon_reason = :reason, "
        "launch_attempts = list_append(if_not_exists(launch_attempts, :empty), :record) "
        "REMOVE launch_task_token, instance_id, launched_attempt",
        values,
        condition + " AND launch_attempt = :attempt",
    )
    if not moved:
        logger.warning(
            "replica changed while its attempt was abandoned",
            extra={"job_id": job_id, "replica_id": replica_id, "attempt": attempt},
        )
        raise ReplicaStopped(f"replica {replica_id} changed while its attempt was abandoned")
    events.launch_attempt_recorded(settings, job_id, replica_id, record)
    logger.warning(
        "replica did not become ready, trying the next candidate",
        extra={"job_id": job_id, "replica_id": replica_id, "reason": reason, "attempt": attempt},
    )
    return {"candidate_index": index + 1, "reason": reason}


@task("fail_replica")
def fail_replica(settings: Settings, event: dict[str, Any]) -> dict[str, Any]:
    """Marks a replica whose every candidate failed ``failed``; fails the job if none is left."""
    job_id, replica_id = event["job_id"], event["replica_id"]
    replica = _require_replica(settings, job_id, replica_id)
    attempts = replica.get("launch_attempts") or []
    reasons = [a.get("reason") for a in attempts if a.get("reason")]
    summary = "; ".join(reasons[-3:]) or "no placement candidate"
    reason = f"every placement candidate failed ({len(attempts)} attempts): {summary}"
    provider = providers.get(replica.get("provider", "external"))
    if provider is not None:
        provider.terminate(job_id, replica_id)
    if not replicas.is_terminal(replica["phase"]):
        try:
            replicas.transition_replica(
                settings, job_id, replica_id, ReplicaPhase.FAILED, reason=reason
            )
        except Conflict:
            logger.info("replica ended before it was failed", extra={"replica_id": replica_id})
    job_failed = fail_job_without_replicas(settings, job_id, reason)
    return {"replica_failed": True, "job_failed": job_failed}


def fail_job_without_replicas(settings: Settings, job_id: str, reason: str) -> bool:
    """Fails a job that still has work and no replica outside a terminal phase."""
    job = jobs.get_job(settings, job_id)
    if job["status"] not in {s.value for s in JOB_ACCEPTS_WORK}:
        return False
    if jobs.progress_of(job)["all_done"]:
        return False
    if live_replicas(settings, job_id):
        return False
    failed = jobs.transition_job(
        settings,
        job_id,
        JobStatus.FAILED,
        extra_set={"failure_reason": f"no replica is left: {reason}"[:2000]},
        strict=False,
    )
    if failed:
        logger.error("job failed: no replica is left", extra={"job_id": job_id, "reason": reason})
        from chalicelib import teardown  # teardown imports this module

        teardown.start_teardown(settings, job_id)
    return failed


def stop_replica(
    settings: Settings,
    replica: dict[str, Any],
    target: ReplicaPhase,
    reason: str,
) -> bool:
    """Moves a replica to a terminal ``target``, returns its leases and stops its machine.

    Returns False when the replica had already ended. Leases go back without spending the
    chunks' retries, as for a kill.
    """
    from chalicelib import chunks  # chunks imports replicas, which imports this module

    job_id, replica_id = replica["job_id"], replica["replica_id"]
    if replicas.is_terminal(replica["phase"]):
        return False
    try:
        replicas.transition_replica(settings, job_id, replica_id, target, reason=reason)
    except Conflict:
        return False
    chunks.reclaim_owned_by(settings, job_id, replica_id)
    provider = providers.get(replica.get("provider", "external"))
    if provider is not None:
        provider.terminate(job_id, replica_id)
    on_stopped(settings, job_id, replica_id, reason)
    return True


def live_replicas(settings: Settings, job_id: str) -> list[dict[str, Any]]:
    return [
        r
        for r in replicas.list_replicas(settings, job_id)
        if ReplicaPhase(r["phase"]) not in REPLICA_TERMINAL
    ]


def job_is_over(job: dict[str, Any]) -> bool:
    return job["status"] in {s.value for s in JOB_TERMINAL} or job["status"] == "assembling"
