"""Job events: status and phase transitions, launch attempts and failures, reclaims and swaps.

Each event is one item in the events table, keyed by job and by time, and expires after
``metrics_ttl_days`` (DynamoDB TTL). Recording an event never fails the operation that caused it:
a failed write is logged and dropped.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib import aws, dynamo, observability
from chalicelib.config import Settings
from chalicelib.errors import InvalidRequest

logger = logging.getLogger(__name__)

MAX_LIST_LIMIT = 500

# Event kinds.
JOB_STATUS = "job_status"
REPLICA_PHASE = "replica_phase"
LAUNCH_ATTEMPT = "launch_attempt"
LAUNCH_FAILED = "launch_failed"
RECLAIM = "reclaim"
RELEASE = "release"
SWAP = "swap"

_ERROR_PHASES = frozenset({"failed", "dead"})


def record(
    settings: Settings,
    job_id: str,
    kind: str,
    message: str,
    *,
    level: str = "info",
    replica_id: str | None = None,
    **details: Any,
) -> None:
    """Stores one event of ``job_id``; ``details`` are kept as they are (JSON-compatible values)."""
    now = time.time()
    item: dict[str, Any] = {
        "job_id": job_id,
        # Milliseconds plus a random suffix: events of the same millisecond keep distinct keys.
        "event_key": f"{int(now * 1000):015d}#{secrets.token_hex(3)}",
        "timestamp": now,
        "kind": kind,
        "level": level,
        "message": message[:1000],
        "expires_at": int(now + settings.metrics_ttl_days * 86400),
    }
    if replica_id:
        item["replica_id"] = replica_id
    clean = {k: v for k, v in details.items() if v is not None}
    if clean:
        item["details"] = clean
    try:
        aws.client("dynamodb").put_item(
            TableName=settings.events_table, Item=dynamo.serialize(item)
        )
    except (ClientError, BotoCoreError) as error:
        logger.warning(
            "event not recorded",
            extra={"job_id": job_id, "kind": kind, "error": str(error)},
        )


def job_status_changed(settings: Settings, job_id: str, status: str) -> None:
    level = {"failed": "error", "succeeded": "ok", "completed_with_errors": "warning"}.get(
        status, "info"
    )
    record(settings, job_id, JOB_STATUS, f"job is {status}", level=level, status=status)


def replica_phase_changed(
    settings: Settings,
    job_id: str,
    replica_id: str,
    previous: str,
    phase: str,
    reason: str | None,
) -> None:
    """Records a replica transition (a swap when the replica was swapped out)."""
    kind = SWAP if phase == "swapped_out" else REPLICA_PHASE
    message = f"replica {replica_id} moved from {previous} to {phase}"
    if reason:
        message += f": {reason}"
    level = "error" if phase in _ERROR_PHASES else "info"
    record(
        settings,
        job_id,
        kind,
        message,
        level=level,
        replica_id=replica_id,
        phase=phase,
        previous_phase=previous,
        reason=reason,
    )


def launch_attempt_recorded(
    settings: Settings, job_id: str, replica_id: str, attempt: dict[str, Any]
) -> None:
    """Records one launch attempt of a replica: ``launch_attempt`` or ``launch_failed``.

    ``attempt`` is the record the launch state machine keeps on the replica (``attempt``,
    ``outcome`` of ``launched``, ``no_capacity`` or ``failed``, the placement and ``reason``).
    """
    outcome = attempt.get("outcome")
    placement = {
        key: attempt.get(key)
        for key in ("instance_type", "gpu_type", "tp_size", "pp_size", "region", "market")
        if attempt.get(key) is not None
    }
    if outcome == "launched":
        record(
            settings,
            job_id,
            LAUNCH_ATTEMPT,
            f"replica {replica_id} launched (attempt {attempt.get('attempt')})",
            replica_id=replica_id,
            attempt=attempt.get("attempt"),
            placement=placement or None,
            instance_id=attempt.get("instance_id"),
        )
        return
    observability.count(observability.LAUNCH_FAILURES)
    reason = str(attempt.get("reason") or outcome)
    record(
        settings,
        job_id,
        LAUNCH_FAILED,
        f"launch of replica {replica_id} failed (attempt {attempt.get('attempt')}): {reason}",
        level="error",
        replica_id=replica_id,
        attempt=attempt.get("attempt"),
        outcome=outcome,
        placement=placement or None,
        reason=reason[:500],
    )


def chunk_taken_back(
    settings: Settings,
    job_id: str,
    chunk_id: str,
    replica_id: str | None,
    reason: str,
    status: str,
) -> None:
    """Records a lease taken back: a reclaim (expiry, stopped replica) or a release."""
    kind = RELEASE if reason.startswith("released") else RECLAIM
    if kind == RECLAIM:
        observability.count(observability.CHUNK_RECLAIMS)
    record(
        settings,
        job_id,
        kind,
        f"chunk {chunk_id} of replica {replica_id or 'unknown'} back to {status}: {reason}",
        level="warning" if status == "failed" else "info",
        replica_id=replica_id,
        chunk_id=chunk_id,
        reason=reason,
        chunk_status=status,
    )


def list_events(
    settings: Settings,
    job_id: str,
    *,
    limit: int,
    next_token: str | None = None,
    since: float | None = None,
) -> dict[str, Any]:
    """Returns a job's events oldest first, one page at a time."""
    query: dict[str, Any] = {
        "TableName": settings.events_table,
        "KeyConditionExpression": "job_id = :job",
        "ExpressionAttributeValues": {":job": {"S": job_id}},
        "Limit": limit,
    }
    if since is not None:
        query["KeyConditionExpression"] += " AND event_key >= :since"
        query["ExpressionAttributeValues"][":since"] = {"S": f"{int(since * 1000):015d}"}
    if next_token:
        query["ExclusiveStartKey"] = _decode_token(next_token)
    page = aws.client("dynamodb").query(**query)
    events = []
    for raw in page.get("Items", []):
        item = dynamo.deserialize(raw)
        events.append(
            {
                "timestamp": item["timestamp"],
                "kind": item["kind"],
                "level": item.get("level", "info"),
                "message": item["message"],
                "replica_id": item.get("replica_id"),
                **(item.get("details") or {}),
            }
        )
    result: dict[str, Any] = {"job_id": job_id, "count": len(events), "events": events}
    if page.get("LastEvaluatedKey"):
        result["next_token"] = base64.urlsafe_b64encode(
            json.dumps(page["LastEvaluatedKey"]).encode()
        ).decode()
    return result


def _decode_token(token: str) -> dict[str, Any]:
    try:
        key = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidRequest(
            f"next_token {token[:40]!r} is not a token this API returned; omit it for the first page"
        ) from error
    if not isinstance(key, dict):
        raise InvalidRequest("next_token is not a token this API returned; omit it")
    return key
