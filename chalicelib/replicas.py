"""Replica identities, their bearer tokens and their phases.

A replica token is ``trk_<replica_id>.<secret>``. Only the SHA-256 of the whole token is
stored, on the replica item; the token is returned once, when the replica is registered. A token
is valid only for its own job and its own replica id.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from typing import Any

from botocore.exceptions import ClientError

from chalicelib import aws, dynamo, jobs, providers, state_events
from chalicelib.config import Settings
from chalicelib.errors import Conflict, Forbidden, InvalidRequest, NotFound, Unauthorized
from chalicelib.models import ID_RE
from chalicelib.states import (
    JOB_TERMINAL,
    REPLICA_TERMINAL,
    JobStatus,
    ReplicaPhase,
    replica_sources_for,
)

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "trk_"
# A verified token maps to the same replica, so a process remembers the mapping and saves one
# GetItem on most replica requests. The replica's phase in the cached item can be stale; every
# write that depends on the phase checks it in its own condition expression. A launched replica
# gets a new token for each launch attempt (chalicelib/lifecycle.py), and the instance of the
# previous attempt is terminated first, so a cached old token has no process left to use it.
AUTH_CACHE_SECONDS = 300.0
AUTH_CACHE_MAX_ENTRIES = 10_000
_auth_cache: dict[str, tuple[float, dict[str, Any]]] = {}
# A replica passes through at most six phases on its way to a terminal one, so five re-reads
# cover a user's request racing the replica's own phase reports.
TRANSITION_ATTEMPTS = 5


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(replica_id: str) -> str:
    return f"{TOKEN_PREFIX}{replica_id}.{secrets.token_urlsafe(32)}"


def get_replica(settings: Settings, job_id: str, replica_id: str) -> dict[str, Any] | None:
    response = aws.client("dynamodb").get_item(
        TableName=settings.replicas_table,
        Key={"job_id": {"S": job_id}, "replica_id": {"S": replica_id}},
        ConsistentRead=True,
    )
    return dynamo.deserialize(response.get("Item"))


def list_replicas(settings: Settings, job_id: str) -> list[dict[str, Any]]:
    client = aws.client("dynamodb")
    query: dict[str, Any] = {
        "TableName": settings.replicas_table,
        "KeyConditionExpression": "job_id = :job",
        "ExpressionAttributeValues": {":job": {"S": job_id}},
    }
    replicas = []
    while True:
        page = client.query(**query)
        replicas.extend(dynamo.deserialize(item) for item in page.get("Items", []))
        if not page.get("LastEvaluatedKey"):
            return replicas
        query["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def authenticate(settings: Settings, job_id: str, authorization: str | None) -> dict[str, Any]:
    """Returns the replica item a bearer token belongs to, if it belongs to ``job_id``.

    Raises Unauthorized for a missing or unknown token and Forbidden for a valid token of
    another job.
    """
    if not authorization:
        raise Unauthorized(
            "missing Authorization header; send 'Authorization: Bearer <replica token>'"
        )
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token.startswith(TOKEN_PREFIX) or "." not in token:
        raise Unauthorized("Authorization must be 'Bearer <replica token>' (a token starting trk_)")
    replica_id = token[len(TOKEN_PREFIX) :].split(".", 1)[0]
    if not ID_RE.match(replica_id):
        raise Unauthorized("replica token is malformed")
    token_hash = hash_token(token)
    cache_key = f"{settings.replicas_table}/{job_id}/{token_hash}"
    cached = _auth_cache.get(cache_key)
    if cached is not None and cached[0] > time.monotonic():
        return cached[1]
    replica = get_replica(settings, job_id, replica_id)
    if replica is None:
        # Either the token is forged or it belongs to another job; both get the same answer so
        # a caller cannot probe which replica ids exist.
        raise Forbidden(f"replica token is not valid for job {job_id!r}")
    if not hmac.compare_digest(replica.get("token_hash", ""), token_hash):
        raise Unauthorized("replica token is not valid")
    if len(_auth_cache) >= AUTH_CACHE_MAX_ENTRIES:
        _auth_cache.clear()
    _auth_cache[cache_key] = (time.monotonic() + AUTH_CACHE_SECONDS, replica)
    return replica


def clear_auth_cache() -> None:
    _auth_cache.clear()


def require_same_replica(replica: dict[str, Any], claimed_replica_id: str) -> None:
    if claimed_replica_id != replica["replica_id"]:
        raise Forbidden(
            f"replica_id {claimed_replica_id!r} does not match the token's replica "
            f"{replica['replica_id']!r}"
        )


def register_replicas(
    settings: Settings,
    job_id: str,
    count: int,
    *,
    provider: str,
    config: dict[str, Any],
) -> dict[str, Any]:
    """Creates ``count`` replica identities for a job and returns their ids and tokens once.

    Replica ids are ``<job>-r<i>`` for the first registration and ``<job>-v<N>-r<i>`` after
    it, with N the job's replica version after this call. Replicas of the ``external`` provider
    get their tokens here. The scale state machine launches the others and issues a token per
    launch attempt, so their entries carry no token.
    """
    from chalicelib import lifecycle  # lifecycle imports this module

    job = jobs.get_job(settings, job_id)
    if job["status"] in JOB_TERMINAL or job["status"] == JobStatus.ASSEMBLING.value:
        raise Conflict(f"job {job_id!r} is {job['status']!r} and cannot take new replicas")
    if job["status"] == JobStatus.VALIDATING.value:
        raise Conflict(f"job {job_id!r} is still validating its input; scale once it is queued")
    if providers.get(provider) is None:
        raise InvalidRequest(
            f"provider {provider!r} is not available here; use one of {providers.available()}",
            field="provider",
        )
    client = aws.client("dynamodb")
    response = client.update_item(
        TableName=settings.jobs_table,
        Key={"job_id": {"S": job_id}},
        UpdateExpression="ADD replica_version :one SET updated_at = :now",
        ExpressionAttributeValues=dynamo.serialize({":one": 1, ":now": time.time()}),
        ReturnValues="UPDATED_NEW",
    )
    version = int(response["Attributes"]["replica_version"]["N"])
    external = provider == "external"
    if not external:
        config = lifecycle.replica_config_for(job, config)
    now = time.time()
    created = []
    for index in range(count):
        replica_id = f"{job_id}-r{index}" if version == 1 else f"{job_id}-v{version}-r{index}"
        token = new_token(replica_id) if external else None
        item = {
            "job_id": job_id,
            "replica_id": replica_id,
            "token_hash": hash_token(token) if token else None,
            "phase": ReplicaPhase.REGISTERED.value,
            "provider": provider,
            "version": version,
            "created_at": now,
            "updated_at": now,
        }
        item.update(config)
        item = {k: v for k, v in item.items() if v is not None}
        client.put_item(
            TableName=settings.replicas_table,
            Item=dynamo.serialize(item),
            ConditionExpression="attribute_not_exists(replica_id)",
        )
        created.append(
            {"replica_id": replica_id, "token": token} if external else {"replica_id": replica_id}
        )
        logger.info("replica registered", extra={"job_id": job_id, "replica_id": replica_id})
    if not external:
        lifecycle.start_scale(settings, job_id, version, [entry["replica_id"] for entry in created])
    return {"version": version, "replicas": created}


def transition_replica(
    settings: Settings,
    job_id: str,
    replica_id: str,
    target: ReplicaPhase,
    *,
    reason: str | None = None,
) -> str:
    """Moves a replica to ``target`` when allowed and returns the phase it came from.

    The write is conditional on the phase it read. When the replica moves in between (a sidecar
    reporting ``running`` while a user kills it), the phase is read again and the move retried as
    long as the new phase still allows it.
    """
    for attempt in range(1, TRANSITION_ATTEMPTS + 1):
        replica = get_replica(settings, job_id, replica_id)
        if replica is None:
            raise NotFound(f"replica {replica_id!r} of job {job_id!r} not found")
        current = replica["phase"]
        if current == target.value:
            return current
        if ReplicaPhase(current) not in replica_sources_for(target):
            raise Conflict(
                f"replica {replica_id!r} cannot move from {current!r} to {target.value!r}",
                replica_id=replica_id,
                current_phase=current,
            )
        if _write_phase(settings, job_id, replica_id, current, target, reason):
            break
        logger.info(
            "replica phase changed during a transition, reading it again",
            extra={"job_id": job_id, "replica_id": replica_id, "attempt": attempt},
        )
    else:
        raise Conflict(
            f"replica {replica_id!r} changed phase {TRANSITION_ATTEMPTS} times during the request;"
            " retry the request"
        )
    logger.info(
        "replica phase changed",
        extra={"job_id": job_id, "replica_id": replica_id, "phase": target.value, "from": current},
    )
    state_events.replica_transitioned(settings, job_id, replica_id, current, target.value, reason)
    return current


def _write_phase(
    settings: Settings,
    job_id: str,
    replica_id: str,
    current: str,
    target: ReplicaPhase,
    reason: str | None,
) -> bool:
    """Writes ``target`` if the phase is still ``current``, and returns False if it moved."""
    values: dict[str, Any] = {":target": target.value, ":now": time.time(), ":current": current}
    expression = "SET phase = :target, updated_at = :now"
    if reason:
        values[":reason"] = reason[:500]
        expression += ", phase_reason = :reason"
    try:
        aws.client("dynamodb").update_item(
            TableName=settings.replicas_table,
            Key={"job_id": {"S": job_id}, "replica_id": {"S": replica_id}},
            UpdateExpression=expression,
            ConditionExpression="phase = :current",
            ExpressionAttributeValues=dynamo.serialize(values),
        )
    except ClientError as error:
        if dynamo.is_condition_failure(error):
            return False
        raise
    return True


def is_terminal(phase: str) -> bool:
    return ReplicaPhase(phase) in REPLICA_TERMINAL


def kill_replicas(settings: Settings, job_id: str, replica_ids: list[str]) -> dict[str, Any]:
    """Marks replicas ``killed`` and returns their leased chunks to the queue at once.

    A kill is not the chunk's fault, so no retry budget is spent. Replicas of another job, unknown
    ids and replicas already in a terminal phase are skipped and listed.
    """
    from chalicelib import chunks, lifecycle  # both import this module

    jobs.get_job(settings, job_id)
    killed: list[str] = []
    skipped: list[dict[str, str]] = []
    reclaimed = 0
    for replica_id in replica_ids:
        replica = get_replica(settings, job_id, replica_id)
        if replica is None:
            skipped.append({"replica_id": replica_id, "reason": f"not a replica of job {job_id}"})
            continue
        if is_terminal(replica["phase"]):
            skipped.append({"replica_id": replica_id, "reason": f"already {replica['phase']}"})
            continue
        try:
            transition_replica(
                settings, job_id, replica_id, ReplicaPhase.KILLED, reason="killed by user"
            )
        except Conflict as error:
            skipped.append({"replica_id": replica_id, "reason": error.message})
            continue
        killed.append(replica_id)
        reclaimed += chunks.reclaim_owned_by(settings, job_id, replica_id)
        launcher = providers.get(replica.get("provider", "external"))
        if launcher is not None:
            launcher.terminate(job_id, replica_id)
        # A replica killed while it starts also ends the launch execution that waits for it.
        lifecycle.on_stopped(settings, job_id, replica_id, "killed by user")
    return {"status": "killing", "killed": killed, "skipped": skipped, "reclaimed": reclaimed}
