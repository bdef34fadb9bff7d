"""The chunk queue: leases that replicas pull, renew, release and complete.

Each chunk is one item; every status change is one conditional write on it, made in the same
``TransactWriteItems`` as the change to the job's counters, so the counters always equal the
chunk items. A pull costs a constant number of requests however many chunks the job has: the
job item carries a claim cursor for the first pass and the set ``requeued`` of chunk indices put
back by a reclaim or release, which are served first, lowest index first. The first pass claims
an index with one atomic increment of the cursor, so concurrent pullers get different chunks
instead of racing for the same one. If the lease transaction that follows fails, the index goes
back in ``requeued``. Correctness never rests on an index read: the conditional write
decides, and a lost race is retried.

A lease carries a random lease token (a fencing token). Renew and release require the current
token; completion is accepted from any attempt that was issued a token for the chunk, and the
first completion wins and records which attempt's output object counts.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from chalicelib import aws, dynamo, jobs, state_events
from chalicelib.config import Settings
from chalicelib.errors import Busy, Conflict, InvalidRequest, LeaseLost, NotFound
from chalicelib.states import JOB_ACCEPTS_WORK, REPLICA_MAY_PULL, ChunkStatus, ReplicaPhase

logger = logging.getLogger(__name__)

# A lost race on the job item (another replica pulled first) is retried this many times, after
# a random pause that grows with each loss, so concurrent pullers spread out.
MAX_CONTENTION_RETRIES = 25
MAX_CONTENTION_PAUSE_SECONDS = 0.2
# Expired leases reclaimed per pull that finds the queue empty; the watchdog reclaims the rest.
RECLAIM_ON_PULL_LIMIT = 10
# The watchdog requeues a pending chunk that no pull can reach once no write has touched the job
# for this long. A pull takes far less.
UNREACHABLE_QUIET_SECONDS = 120
# Owner phases whose lost leases do not spend the chunk's retry budget.
_NOT_THE_CHUNKS_FAULT = frozenset({"killed", "swapped_out", "draining", "completed", "preempting"})


def chunk_id_for(index: int) -> str:
    return f"c{index:06d}"


def index_of(chunk_id: str) -> int:
    return int(chunk_id[1:])


def output_key_for(job_id: str, chunk_id: str, lease_token: str) -> str:
    # One object per attempt, so attempts of the same chunk never overwrite each other.
    return f"jobs/{job_id}/chunks/{chunk_id}/{lease_token}.jsonl"


@dataclass(frozen=True)
class Lease:
    job_id: str
    chunk_id: str
    chunk_index: int
    lease_token: str
    lease_expires_at: float
    attempt: int
    chunk: dict[str, Any]
    job: dict[str, Any]


def _accepting_values() -> dict[str, Any]:
    return {f":ok{i}": status.value for i, status in enumerate(sorted(JOB_ACCEPTS_WORK))}


def _accepting_condition() -> str:
    return "#status IN (" + ", ".join(f":ok{i}" for i in range(len(JOB_ACCEPTS_WORK))) + ")"


def _may_pull_values() -> dict[str, Any]:
    return {f":mp{i}": phase.value for i, phase in enumerate(sorted(REPLICA_MAY_PULL))}


def _may_pull_condition() -> str:
    return "phase IN (" + ", ".join(f":mp{i}" for i in range(len(REPLICA_MAY_PULL))) + ")"


def get_chunk(settings: Settings, job_id: str, chunk_index: int) -> dict[str, Any]:
    response = aws.client("dynamodb").get_item(
        TableName=settings.chunks_table,
        Key={"job_id": {"S": job_id}, "chunk_index": {"N": str(chunk_index)}},
        ConsistentRead=True,
    )
    item = dynamo.deserialize(response.get("Item"))
    if item is None:
        raise NotFound(f"chunk {chunk_id_for(chunk_index)!r} of job {job_id!r} not found")
    return item


def write_chunks(settings: Settings, job_id: str, spans: list[Any]) -> None:
    """Creates the pending chunk items of a new job (BatchWriteItem, 25 items a call)."""
    client = aws.client("dynamodb")
    requests = []
    for span in spans:
        item = {
            "job_id": job_id,
            "chunk_index": span.index,
            "chunk_id": chunk_id_for(span.index),
            "status": ChunkStatus.PENDING.value,
            "first_line": span.first_line,
            "last_line": span.last_line,
            "byte_start": span.byte_start,
            "byte_end": span.byte_end,
            "request_count": span.request_count,
            "attempts": 0,
            "failures": 0,
        }
        requests.append({"PutRequest": {"Item": dynamo.serialize(item)}})
    for start in range(0, len(requests), 25):
        batch = {settings.chunks_table: requests[start : start + 25]}
        delay = 0.05
        while batch:
            response = client.batch_write_item(RequestItems=batch)
            batch = response.get("UnprocessedItems") or {}
            if batch:
                logger.warning("retrying unprocessed chunk writes", extra={"job_id": job_id})
                time.sleep(delay)
                delay = min(delay * 2, 2.0)


def pull(settings: Settings, job_id: str, replica: dict[str, Any]) -> Lease | None:
    """Leases the next chunk to ``replica``; returns None when nothing is pending."""
    replica_id = replica["replica_id"]
    if ReplicaPhase(replica["phase"]) not in REPLICA_MAY_PULL:
        return None
    reclaimed_once = False
    for attempt in range(MAX_CONTENTION_RETRIES):
        job = _claim_first_pass(settings, job_id)
        if job is not None:
            index = int(job["next_chunk_index"]) - 1
            from_requeued = False
        else:
            job = jobs.get_job(settings, job_id)
            if job["status"] not in {s.value for s in JOB_ACCEPTS_WORK}:
                return None
            requeued = job.get("requeued") or set()
            if requeued:
                index = min(requeued)
                from_requeued = True
            elif int(job["next_chunk_index"]) < int(job["total_chunks"]):
                # The last requeued chunk was taken between the claim and the read.
                continue
            else:
                if int(job.get("inflight", 0)) > 0 and not reclaimed_once:
                    reclaimed_once = True
                    if reclaim_expired(settings, job_id, limit=RECLAIM_ON_PULL_LIMIT):
                        continue
                return None
        outcome = _lease(settings, job, replica_id, index, from_requeued=from_requeued)
        if isinstance(outcome, Lease):
            return outcome
        if outcome == "stop":
            return None
        logger.info(
            "pull lost a race, retrying",
            extra={
                "job_id": job_id,
                "replica_id": replica_id,
                "chunk_id": chunk_id_for(index),
                "attempt": attempt + 1,
            },
        )
        time.sleep(random.uniform(0, min(MAX_CONTENTION_PAUSE_SECONDS, 0.005 * 2**attempt)))
    logger.warning(
        "pull gave up after lost races", extra={"job_id": job_id, "replica_id": replica_id}
    )
    raise Busy(
        f"too many replicas pulled from job {job_id!r} at once; retry the pull",
        retry_after_seconds=1,
    )


def _claim_first_pass(settings: Settings, job_id: str) -> dict[str, Any] | None:
    """Advances the first-pass cursor by one atomic update; returns the job item after it.

    Concurrent pullers each get a different index without racing on a condition. The claim only
    applies while no requeued chunk waits, because those are served first, and while the job
    accepts work. Otherwise it returns None and the caller reads the job.
    """
    values = {":one": 1, ":zero": 0, **_accepting_values()}
    try:
        response = aws.client("dynamodb").update_item(
            TableName=settings.jobs_table,
            Key={"job_id": {"S": job_id}},
            UpdateExpression="SET next_chunk_index = next_chunk_index + :one",
            ConditionExpression="(attribute_not_exists(requeued) OR size(requeued) = :zero) "
            f"AND next_chunk_index < total_chunks AND {_accepting_condition()}",
            ExpressionAttributeNames={"#status": "status"},
            ExpressionAttributeValues=dynamo.serialize(values),
            ReturnValues="ALL_NEW",
        )
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
            return None
        raise
    return dynamo.deserialize(response["Attributes"])


def _lease(
    settings: Settings, job: dict[str, Any], replica_id: str, index: int, *, from_requeued: bool
) -> Lease | str:
    """Moves chunk ``index`` to inflight for the replica; returns the lease, "retry" or "stop".

    A claimed first-pass index that cannot be leased is put back in ``requeued``, so the chunk
    stays reachable.
    """
    job_id = job["job_id"]
    now = time.time()
    token = secrets.token_urlsafe(16)
    expires = now + settings.lease_seconds
    job_values: dict[str, Any] = {":one": 1, ":now": now, **_accepting_values()}
    job_update = {
        "UpdateExpression": "SET pending = pending - :one, inflight = inflight + :one, "
        "updated_at = :now",
        "ConditionExpression": _accepting_condition(),
    }
    if from_requeued:
        job_values[":idx_set"] = {index}
        job_values[":idx"] = index
        job_update["UpdateExpression"] += " DELETE requeued :idx_set"
        job_update["ConditionExpression"] = f"contains(requeued, :idx) AND {_accepting_condition()}"
    chunk_values = {
        ":pending": ChunkStatus.PENDING.value,
        ":inflight": ChunkStatus.INFLIGHT.value,
        ":token": token,
        ":tokens": {token},
        ":owner": replica_id,
        ":job": job_id,
        ":expires": expires,
        ":now": now,
        ":one": 1,
    }
    replica_values = {":now": now, **_may_pull_values()}
    items = [
        {
            "Update": {
                "TableName": settings.jobs_table,
                "Key": {"job_id": {"S": job_id}},
                "ExpressionAttributeNames": {"#status": "status"},
                "ExpressionAttributeValues": dynamo.serialize(job_values),
                **job_update,
            }
        },
        {
            "Update": {
                "TableName": settings.chunks_table,
                "Key": {"job_id": {"S": job_id}, "chunk_index": {"N": str(index)}},
                "UpdateExpression": "SET #status = :inflight, lease_token = :token, "
                "lease_owner = :owner, lease_job_id = :job, lease_expires_at = :expires, "
                "leased_at = :now, attempts = attempts + :one ADD tokens :tokens",
                "ConditionExpression": "#status = :pending",
                "ExpressionAttributeNames": {"#status": "status"},
                "ExpressionAttributeValues": dynamo.serialize(chunk_values),
            }
        },
        {
            # The replica's heartbeat rides on the pull; the condition stops a replica that
            # was killed or is draining from taking new work.
            "Update": {
                "TableName": settings.replicas_table,
                "Key": {"job_id": {"S": job_id}, "replica_id": {"S": replica_id}},
                "UpdateExpression": "SET last_heartbeat = :now",
                "ConditionExpression": _may_pull_condition(),
                "ExpressionAttributeValues": dynamo.serialize(replica_values),
            }
        },
    ]
    try:
        aws.client("dynamodb").transact_write_items(TransactItems=items)
    except ClientError as error:
        if not dynamo.is_transaction_cancelled(error):
            raise
        codes = dynamo.cancellation_codes(error)
        chunk_not_pending = len(codes) == 3 and codes[1] == "ConditionalCheckFailed"
        if chunk_not_pending and from_requeued:
            _forget_requeued(settings, job_id, index)
        elif not from_requeued and not chunk_not_pending:
            _requeue_claimed(settings, job_id, replica_id, index)
        replica_rejected = len(codes) == 3 and codes[2] == "ConditionalCheckFailed"
        job_rejected = len(codes) == 3 and codes[0] == "ConditionalCheckFailed"
        if replica_rejected or (job_rejected and not from_requeued):
            return "stop"
        return "retry"
    chunk = get_chunk(settings, job_id, index)
    logger.info(
        "chunk leased",
        extra={"job_id": job_id, "replica_id": replica_id, "chunk_id": chunk_id_for(index)},
    )
    return Lease(
        job_id=job_id,
        chunk_id=chunk_id_for(index),
        chunk_index=index,
        lease_token=token,
        lease_expires_at=expires,
        attempt=int(chunk.get("attempts", 1)),
        chunk=chunk,
        job=job,
    )


def _requeue_claimed(settings: Settings, job_id: str, replica_id: str, index: int) -> None:
    """Puts a claimed first-pass index that was not leased back in ``requeued``."""
    aws.client("dynamodb").update_item(
        TableName=settings.jobs_table,
        Key={"job_id": {"S": job_id}},
        UpdateExpression="ADD requeued :idx_set",
        ExpressionAttributeValues=dynamo.serialize({":idx_set": {index}}),
    )
    logger.info(
        "claimed chunk put back in the queue",
        extra={"job_id": job_id, "replica_id": replica_id, "chunk_id": chunk_id_for(index)},
    )


def _change_requeued_if(
    settings: Settings, job_id: str, index: int, *, action: str, chunk_condition: str
) -> bool:
    """Adds or deletes ``index`` in ``requeued`` if the chunk meets ``chunk_condition``.

    One transaction: a ``ConditionCheck`` on the chunk item and the update of the job item.
    ``action`` is ``ADD`` or ``DELETE``. Returns False when the condition did not hold.
    """
    items = [
        {
            "ConditionCheck": {
                "TableName": settings.chunks_table,
                "Key": {"job_id": {"S": job_id}, "chunk_index": {"N": str(index)}},
                "ConditionExpression": chunk_condition,
                "ExpressionAttributeNames": {"#status": "status"},
                "ExpressionAttributeValues": dynamo.serialize(
                    {":pending": ChunkStatus.PENDING.value}
                ),
            }
        },
        {
            "Update": {
                "TableName": settings.jobs_table,
                "Key": {"job_id": {"S": job_id}},
                "UpdateExpression": f"{action} requeued :idx_set",
                "ExpressionAttributeValues": dynamo.serialize({":idx_set": {index}}),
            }
        },
    ]
    try:
        aws.client("dynamodb").transact_write_items(TransactItems=items)
    except ClientError as error:
        if not dynamo.is_transaction_cancelled(error):
            raise
        return False
    return True


def _forget_requeued(settings: Settings, job_id: str, index: int) -> None:
    """Drops ``index`` from ``requeued`` if its chunk is no longer pending, in one transaction."""
    if not _change_requeued_if(
        settings, job_id, index, action="DELETE", chunk_condition="#status <> :pending"
    ):
        return
    logger.warning(
        "stale requeued entry removed: its chunk is not pending",
        extra={"job_id": job_id, "chunk_id": chunk_id_for(index)},
    )


def recover_unreachable(settings: Settings, job: dict[str, Any], now: float) -> int:
    """Requeues pending chunks behind the cursor that no pull can reach; returns how many.

    A pull that claimed a first-pass index and died before leasing it or putting it back (a
    Lambda killed between two requests) leaves such a chunk. The counters show it cheaply:
    pending chunks are the requeued ones plus those at or past the cursor. The query that finds
    them reads the job's chunks, so it runs only when the counters disagree and the job has
    been quiet for ``UNREACHABLE_QUIET_SECONDS``, longer than any pull takes.
    """
    job_id = job["job_id"]
    cursor = int(job["next_chunk_index"])
    requeued = job.get("requeued") or set()
    reachable = len(requeued) + max(0, int(job["total_chunks"]) - cursor)
    if int(job.get("pending", 0)) <= reachable:
        return 0
    if now - float(job.get("updated_at", 0)) < UNREACHABLE_QUIET_SECONDS:
        return 0
    client = aws.client("dynamodb")
    query: dict[str, Any] = {
        "TableName": settings.chunks_table,
        "ConsistentRead": True,
        "KeyConditionExpression": "job_id = :job AND chunk_index < :cursor",
        "FilterExpression": "#status = :pending",
        "ProjectionExpression": "chunk_index",
        "ExpressionAttributeNames": {"#status": "status"},
        "ExpressionAttributeValues": dynamo.serialize(
            {":job": job_id, ":cursor": cursor, ":pending": ChunkStatus.PENDING.value}
        ),
    }
    recovered = 0
    while True:
        page = client.query(**query)
        for raw in page.get("Items", []):
            index = int(dynamo.deserialize(raw)["chunk_index"])
            if index in requeued:
                continue
            if not _change_requeued_if(
                settings, job_id, index, action="ADD", chunk_condition="#status = :pending"
            ):
                continue
            recovered += 1
            logger.warning(
                "unreachable pending chunk requeued by recovery",
                extra={"job_id": job_id, "chunk_id": chunk_id_for(index)},
            )
        if "LastEvaluatedKey" not in page:
            return recovered
        query["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def renew(
    settings: Settings, job_id: str, replica_id: str, chunk_id: str, lease_token: str
) -> float:
    """Extends a lease; raises LeaseLost when the token is no longer the chunk's current one."""
    now = time.time()
    expires = now + settings.lease_seconds
    values = {
        ":inflight": ChunkStatus.INFLIGHT.value,
        ":token": lease_token,
        ":owner": replica_id,
        ":expires": expires,
        ":now": now,
    }
    items = [
        {
            "Update": {
                "TableName": settings.chunks_table,
                "Key": {"job_id": {"S": job_id}, "chunk_index": {"N": str(index_of(chunk_id))}},
                "UpdateExpression": "SET lease_expires_at = :expires, renewed_at = :now",
                "ConditionExpression": "#status = :inflight AND lease_token = :token "
                "AND lease_owner = :owner",
                "ExpressionAttributeNames": {"#status": "status"},
                "ExpressionAttributeValues": dynamo.serialize(values),
            }
        },
        {
            "Update": {
                "TableName": settings.replicas_table,
                "Key": {"job_id": {"S": job_id}, "replica_id": {"S": replica_id}},
                "UpdateExpression": "SET last_heartbeat = :now",
                "ConditionExpression": "attribute_exists(replica_id)",
                "ExpressionAttributeValues": dynamo.serialize({":now": now}),
            }
        },
    ]
    try:
        aws.client("dynamodb").transact_write_items(TransactItems=items)
    except ClientError as error:
        if not dynamo.is_transaction_cancelled(error):
            raise
        raise LeaseLost(
            f"lease on chunk {chunk_id!r} is no longer held by this token; stop working on it",
            chunk_id=chunk_id,
        ) from error
    return expires


def _counter_change(from_status: str) -> str:
    return {
        ChunkStatus.INFLIGHT.value: "inflight = inflight - :one",
        ChunkStatus.PENDING.value: "pending = pending - :one",
        ChunkStatus.FAILED.value: "failed = failed - :one",
    }[from_status]


def _requeue_transaction(
    settings: Settings,
    job_id: str,
    index: int,
    lease_token: str,
    *,
    spend_failure: bool,
    fail_chunk: bool,
    error_message: str | None,
    extra_condition: str = "",
    extra_values: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Builds the transaction that takes a lease back: to pending, or to failed."""
    now = time.time()
    chunk_values: dict[str, Any] = {
        ":inflight": ChunkStatus.INFLIGHT.value,
        ":token": lease_token,
        ":now": now,
        ":spent": 1 if spend_failure else 0,
        ":target": (ChunkStatus.FAILED if fail_chunk else ChunkStatus.PENDING).value,
    }
    chunk_values.update(extra_values or {})
    update = (
        "SET #status = :target, failures = failures + :spent, released_at = :now "
        "REMOVE lease_token, lease_owner, lease_job_id, lease_expires_at"
    )
    if error_message:
        chunk_values[":error"] = error_message[:2000]
        update = update.replace("released_at = :now", "released_at = :now, last_error = :error")
    job_values: dict[str, Any] = {":one": 1, ":now": now}
    if fail_chunk:
        job_update = "SET inflight = inflight - :one, failed = failed + :one, updated_at = :now"
    else:
        job_values[":idx_set"] = {index}
        job_update = (
            "SET inflight = inflight - :one, pending = pending + :one, updated_at = :now "
            "ADD requeued :idx_set"
        )
    return [
        {
            "Update": {
                "TableName": settings.chunks_table,
                "Key": {"job_id": {"S": job_id}, "chunk_index": {"N": str(index)}},
                "UpdateExpression": update,
                "ConditionExpression": "#status = :inflight AND lease_token = :token"
                + extra_condition,
                "ExpressionAttributeNames": {"#status": "status"},
                "ExpressionAttributeValues": dynamo.serialize(chunk_values),
            }
        },
        {
            "Update": {
                "TableName": settings.jobs_table,
                "Key": {"job_id": {"S": job_id}},
                "UpdateExpression": job_update,
                "ExpressionAttributeValues": dynamo.serialize(job_values),
            }
        },
    ]


def _take_back(
    settings: Settings,
    job_id: str,
    chunk: dict[str, Any],
    *,
    spend_failure: bool,
    reason: str,
    error_message: str | None = None,
    require_expired_before: float | None = None,
) -> str | None:
    """Takes back the chunk's current lease; returns the chunk's new status, None if lost."""
    index = int(chunk["chunk_index"])
    failures_after = int(chunk.get("failures", 0)) + (1 if spend_failure else 0)
    fail_chunk = spend_failure and failures_after >= settings.max_chunk_failures
    extra_condition = ""
    extra_values: dict[str, Any] = {}
    if require_expired_before is not None:
        extra_condition = " AND lease_expires_at < :cutoff"
        extra_values[":cutoff"] = require_expired_before
    items = _requeue_transaction(
        settings,
        job_id,
        index,
        chunk["lease_token"],
        spend_failure=spend_failure,
        fail_chunk=fail_chunk,
        error_message=error_message,
        extra_condition=extra_condition,
        extra_values=extra_values,
    )
    try:
        aws.client("dynamodb").transact_write_items(TransactItems=items)
    except ClientError as error:
        if dynamo.is_transaction_cancelled(error):
            return None
        raise
    new_status = ChunkStatus.FAILED if fail_chunk else ChunkStatus.PENDING
    log = logger.warning if fail_chunk else logger.info
    log(
        "chunk lease taken back",
        extra={
            "job_id": job_id,
            "chunk_id": chunk_id_for(index),
            "replica_id": chunk.get("lease_owner"),
            "reason": reason,
            "failures": failures_after,
            "status": new_status.value,
        },
    )
    state_events.chunk_taken_back(
        settings, job_id, chunk_id_for(index), chunk.get("lease_owner"), reason, new_status.value
    )
    return new_status.value


def release(
    settings: Settings,
    job_id: str,
    replica_id: str,
    chunk_id: str,
    lease_token: str,
    *,
    reason: str,
    error_message: str | None,
) -> str:
    """Gives a lease back. Only ``reason == "error"`` spends the chunk's retry budget."""
    chunk = get_chunk(settings, job_id, index_of(chunk_id))
    if (
        chunk.get("status") != ChunkStatus.INFLIGHT.value
        or chunk.get("lease_token") != lease_token
        or chunk.get("lease_owner") != replica_id
    ):
        raise LeaseLost(
            f"lease on chunk {chunk_id!r} is no longer held by this token; nothing to release",
            chunk_id=chunk_id,
        )
    status = _take_back(
        settings,
        job_id,
        chunk,
        spend_failure=reason == "error",
        reason=f"released: {reason}",
        error_message=error_message,
    )
    if status is None:
        raise LeaseLost(
            f"lease on chunk {chunk_id!r} changed while releasing it", chunk_id=chunk_id
        )
    return status


def reclaim_expired(settings: Settings, job_id: str, *, limit: int = 100) -> int:
    """Takes back leases that expired, through the sparse ``leases_by_expiry`` index.

    An expired lease spends one failure from the chunk's retry budget, unless its owner was
    killed, swapped out or drained, which are not the chunk's fault.
    """
    now = time.time()
    client = aws.client("dynamodb")
    page = client.query(
        TableName=settings.chunks_table,
        IndexName="leases_by_expiry",
        KeyConditionExpression="lease_job_id = :job AND lease_expires_at < :now",
        ExpressionAttributeValues=dynamo.serialize({":job": job_id, ":now": now}),
        Limit=limit,
    )
    reclaimed = 0
    owner_phases: dict[str, str | None] = {}
    for raw in page.get("Items", []):
        entry = dynamo.deserialize(raw)
        # The index is eventually consistent: read the chunk itself, and let the conditional
        # write decide.
        chunk = get_chunk(settings, job_id, int(entry["chunk_index"]))
        if chunk.get("status") != ChunkStatus.INFLIGHT.value:
            continue
        if float(chunk.get("lease_expires_at", now + 1)) >= now:
            continue
        owner = chunk.get("lease_owner")
        if owner not in owner_phases:
            from chalicelib import replicas  # a cycle at import time otherwise

            found = replicas.get_replica(settings, job_id, owner) if owner else None
            owner_phases[owner] = found.get("phase") if found else None
        spend = owner_phases[owner] not in _NOT_THE_CHUNKS_FAULT
        status = _take_back(
            settings,
            job_id,
            chunk,
            spend_failure=spend,
            reason="lease expired",
            error_message="lease expired without renewal" if spend else None,
            require_expired_before=now,
        )
        if status is not None:
            reclaimed += 1
    return reclaimed


def reclaim_owned_by(
    settings: Settings, job_id: str, replica_id: str, *, spend_failure: bool = False
) -> int:
    """Returns a replica's leases to the queue at once (kill, drain, a dead replica).

    Retries are spent only with ``spend_failure``: the watchdog spends one for a replica that
    stopped sending heartbeats, as a lease expiry would.
    """
    client = aws.client("dynamodb")
    query: dict[str, Any] = {
        "TableName": settings.chunks_table,
        "IndexName": "leases_by_owner",
        "KeyConditionExpression": "lease_owner = :owner",
        "ExpressionAttributeValues": {":owner": {"S": replica_id}},
    }
    reclaimed = 0
    while True:
        page = client.query(**query)
        for raw in page.get("Items", []):
            entry = dynamo.deserialize(raw)
            if entry.get("job_id") != job_id:
                continue
            chunk = get_chunk(settings, job_id, int(entry["chunk_index"]))
            if (
                chunk.get("status") != ChunkStatus.INFLIGHT.value
                or chunk.get("lease_owner") != replica_id
            ):
                continue
            if _take_back(
                settings,
                job_id,
                chunk,
                spend_failure=spend_failure,
                reason="replica stopped",
                error_message="replica stopped sending heartbeats" if spend_failure else None,
            ):
                reclaimed += 1
        if not page.get("LastEvaluatedKey"):
            return reclaimed
        query["ExclusiveStartKey"] = page["LastEvaluatedKey"]


@dataclass(frozen=True)
class CompletionResult:
    status: str  # "completed" or "already_completed"
    progress: dict[str, Any]


def complete(
    settings: Settings,
    job_id: str,
    replica_id: str,
    chunk_id: str,
    lease_token: str,
    *,
    output_key: str | None,
    object_exists: Any,
    counts: dict[str, int] | None = None,
) -> CompletionResult:
    """Records a chunk as completed by the attempt holding ``lease_token``.

    The first completion wins; a later one (a reclaimed attempt that finished after all) gets
    ``already_completed`` and changes nothing. ``object_exists(key)`` checks that the attempt's
    output was uploaded before the completion counts. ``counts`` (requests and tokens the attempt
    reported) feed the job's live progress; assembly recounts requests from the output itself.
    """
    counts = counts or {}
    index = index_of(chunk_id)
    expected_key = output_key_for(job_id, chunk_id, lease_token)
    if output_key is not None and output_key != expected_key:
        raise InvalidRequest(
            f"output_key {output_key!r} is not this attempt's output key; write the output to "
            f"{expected_key!r}, the output_key returned by the pull"
        )
    client = aws.client("dynamodb")
    # Most completions come from the current lease holder, so try "inflight" first and read
    # the chunk only when that guess fails.
    observed = ChunkStatus.INFLIGHT.value
    verified_output = False
    for _ in range(4):
        if observed == ChunkStatus.COMPLETED.value:
            job = jobs.get_job(settings, job_id)
            return CompletionResult("already_completed", jobs.progress_of(job))
        if not verified_output:
            if not object_exists(expected_key):
                # A token never issued for this chunk has no output key either; say so first.
                chunk = get_chunk(settings, job_id, index)
                if lease_token not in (chunk.get("tokens") or set()):
                    raise LeaseLost(
                        f"lease token was never issued for chunk {chunk_id!r}; only an attempt "
                        "that pulled the chunk can complete it",
                        chunk_id=chunk_id,
                    )
                raise InvalidRequest(
                    f"output object {expected_key!r} for chunk {chunk_id!r} was not found; upload "
                    "the chunk's output before completing it"
                )
            verified_output = True
        now = time.time()
        chunk_values = {
            ":observed": observed,
            ":completed": ChunkStatus.COMPLETED.value,
            ":token": lease_token,
            ":key": expected_key,
            ":by": replica_id,
            ":now": now,
        }
        job_values = {
            ":one": 1,
            ":now": now,
            ":rs": int(counts.get("requests_succeeded", 0)),
            ":rf": int(counts.get("requests_failed", 0)),
            ":pt": int(counts.get("prompt_tokens", 0)),
            ":gt": int(counts.get("generation_tokens", 0)),
            **_accepting_values(),
        }
        job_update = (
            f"SET {_counter_change(observed)}, completed = completed + :one, updated_at = :now "
            "ADD live_requests_succeeded :rs, live_requests_failed :rf, "
            "prompt_tokens_total :pt, generation_tokens_total :gt"
        )
        if observed == ChunkStatus.PENDING.value:
            job_values[":idx_set"] = {index}
            job_update += " DELETE requeued :idx_set"
        items = [
            {
                "Update": {
                    "TableName": settings.chunks_table,
                    "Key": {"job_id": {"S": job_id}, "chunk_index": {"N": str(index)}},
                    "UpdateExpression": "SET #status = :completed, completed_token = :token, "
                    "output_key = :key, completed_by = :by, completed_at = :now "
                    "REMOVE lease_token, lease_owner, lease_job_id, lease_expires_at",
                    "ConditionExpression": "#status = :observed AND contains(tokens, :token)",
                    "ExpressionAttributeNames": {"#status": "status"},
                    "ExpressionAttributeValues": dynamo.serialize(chunk_values),
                }
            },
            {
                "Update": {
                    "TableName": settings.jobs_table,
                    "Key": {"job_id": {"S": job_id}},
                    "UpdateExpression": job_update,
                    "ConditionExpression": _accepting_condition(),
                    "ExpressionAttributeNames": {"#status": "status"},
                    "ExpressionAttributeValues": dynamo.serialize(job_values),
                }
            },
            {
                # The completing replica's count, in the same transaction so it costs no extra
                # request; a swap counts the new replicas that have completed a chunk.
                "Update": {
                    "TableName": settings.replicas_table,
                    "Key": {"job_id": {"S": job_id}, "replica_id": {"S": replica_id}},
                    "UpdateExpression": "ADD chunks_completed :one SET last_heartbeat = :now",
                    "ConditionExpression": "attribute_exists(replica_id)",
                    "ExpressionAttributeValues": dynamo.serialize({":one": 1, ":now": now}),
                }
            },
        ]
        try:
            client.transact_write_items(TransactItems=items)
        except ClientError as error:
            if not dynamo.is_transaction_cancelled(error):
                raise
            codes = dynamo.cancellation_codes(error)
            chunk = get_chunk(settings, job_id, index)
            if lease_token not in (chunk.get("tokens") or set()):
                raise LeaseLost(
                    f"lease token was never issued for chunk {chunk_id!r}; only an attempt that "
                    "pulled the chunk can complete it",
                    chunk_id=chunk_id,
                ) from error
            if (
                len(codes) >= 2
                and codes[1] == "ConditionalCheckFailed"
                and chunk["status"] != ChunkStatus.COMPLETED.value
            ):
                job = jobs.get_job(settings, job_id)
                raise Conflict(
                    f"job {job_id!r} is {job['status']!r} and takes no more completions",
                    job_status=job["status"],
                ) from error
            observed = chunk["status"]
            continue
        logger.info(
            "chunk completed",
            extra={
                "job_id": job_id,
                "replica_id": replica_id,
                "chunk_id": chunk_id,
                "from": observed,
            },
        )
        job = jobs.get_job(settings, job_id)
        return CompletionResult("completed", jobs.progress_of(job))
    raise Conflict(f"chunk {chunk_id!r} changed state repeatedly while completing; retry")


def lease_response(settings: Settings, lease: Lease) -> dict[str, Any]:
    """Shapes the body of a successful pull."""
    chunk, job = lease.chunk, lease.job
    input_bucket, input_key = job["input_bucket"], job["input_key"]
    return {
        "job_id": lease.job_id,
        "chunk_id": lease.chunk_id,
        "chunk_index": lease.chunk_index,
        "status": ChunkStatus.INFLIGHT.value,
        "first_line": chunk["first_line"],
        "last_line": chunk["last_line"],
        "byte_start": chunk["byte_start"],
        "byte_end": chunk["byte_end"],
        "num_lines": chunk["request_count"],
        "input_bucket": input_bucket,
        "input_key": input_key,
        "input_etag": job.get("input_etag"),
        "s3_input_path": f"s3://{input_bucket}/{input_key}",
        "lease_token": lease.lease_token,
        "lease_expires_at": lease.lease_expires_at,
        "lease_seconds": settings.lease_seconds,
        "attempt": lease.attempt,
        "retry_count": int(chunk.get("failures", 0)),
        "output_bucket": settings.bucket,
        "output_key": output_key_for(lease.job_id, lease.chunk_id, lease.lease_token),
        "s3_output_path": f"s3://{settings.bucket}/"
        + output_key_for(lease.job_id, lease.chunk_id, lease.lease_token),
        "model_name": job.get("model_name"),
        "max_output_tokens": (job.get("requested") or {}).get("max_output_tokens"),
    }
