"""Replica metrics in DynamoDB: ingest, retirement, job and replica snapshots, timeseries.

Items of the metrics table, all under the job's partition key, by ``metric_key``:

- ``state#<replica>``: the replica's cumulative sample (chalicelib/snapshots.py) plus the sidecar
  session and the last applied snapshot ``seq``; one per replica that is still active.
- ``state~retired``: counters and histograms of the job's finished replicas, added together.
- ``final#<replica>``: a finished replica's last sample, for its per-replica snapshot.
- ``ts#<timestamp>#<replica>#<seq>``: one timeseries row per snapshot.
- ``summary#<replica>``: the final summary a replica's sidecar posts.

Every item expires ``metrics_ttl_days`` after it was last written (DynamoDB TTL on
``expires_at``). Ingest costs the same requests however many replicas the job has: one GetItem
of the replica's own state item, one TransactWriteItems (the state item, a condition that the
replica has not finished, one row per snapshot) and one UpdateItem of the replica's heartbeat.
``job_metrics`` is one Query that returns the active replicas' state items and the retired item.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from typing import Any

from botocore.exceptions import ClientError

from chalicelib import aws, dynamo, observability, snapshots
from chalicelib.config import Settings
from chalicelib.errors import Conflict, InvalidRequest, NotFound
from chalicelib.models import MetricsIngestRequest
from chalicelib.states import ReplicaPhase, replica_sources_for

logger = logging.getLogger(__name__)

STATE_PREFIX = "state#"
RETIRED_KEY = "state~retired"
FINAL_PREFIX = "final#"
SERIES_PREFIX = "ts#"
SUMMARY_PREFIX = "summary#"
# Two ingests of the same replica that race (a retried request overtaking its original) re-read
# the state item and try again this many times.
MAX_WRITE_ATTEMPTS = 4
MAX_SERIES_LIMIT = 10_000
# Phases from which metrics arriving from a replica move it to running.
_MOVES_TO_RUNNING = frozenset(replica_sources_for(ReplicaPhase.RUNNING))
# Attributes of a state item that timeseries rows and snapshots do not carry.
_STATE_ONLY = ("recent", "session", "seq", "version", "metric_key", "expires_at")


def series_key(timestamp: float, replica_id: str, seq: int) -> str:
    # Fixed width keeps the keys in time order until the year 2286.
    return f"{SERIES_PREFIX}{timestamp:017.6f}#{replica_id}#{seq:010d}"


def _expires_at(settings: Settings, now: float) -> int:
    return int(now + settings.metrics_ttl_days * 86400)


def _key(job_id: str, metric_key: str) -> dict[str, Any]:
    return {"job_id": {"S": job_id}, "metric_key": {"S": metric_key}}


def _get(settings: Settings, job_id: str, metric_key: str) -> dict[str, Any] | None:
    response = aws.client("dynamodb").get_item(
        TableName=settings.metrics_table, Key=_key(job_id, metric_key), ConsistentRead=True
    )
    return dynamo.deserialize(response.get("Item"))


def _query(settings: Settings, query: dict[str, Any]) -> list[dict[str, Any]]:
    client = aws.client("dynamodb")
    request = {"TableName": settings.metrics_table, "ConsistentRead": True, **query}
    items: list[dict[str, Any]] = []
    while True:
        page = client.query(**request)
        items.extend(dynamo.deserialize(raw) for raw in page.get("Items", []))
        if not page.get("LastEvaluatedKey"):
            return items
        request["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def _sample_of(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k not in _STATE_ONLY}


# Ingest.


def ingest(settings: Settings, job_id: str, request: MetricsIngestRequest) -> dict[str, Any]:
    """Adds a batch of snapshot deltas to the replica's state and stores one row per snapshot.

    Snapshots already applied (same session, ``seq`` not above the stored one) are skipped, so
    a batch that the sidecar sends again after a lost response is counted once. Raises Conflict
    when the replica has finished: its counters were already added to the job's retired totals.
    """
    replica_id = request.replica_id
    state_key = STATE_PREFIX + replica_id
    client = aws.client("dynamodb")
    ordered = sorted(request.snapshots, key=lambda s: s.seq)
    applied: list[dict[str, Any]] = []
    for attempt in range(MAX_WRITE_ATTEMPTS):
        now = time.time()
        state = _get(settings, job_id, state_key)
        version = int(state.get("version", 0)) if state else 0
        sample: dict[str, Any] = dict(state) if state else {"replica_id": replica_id}
        same_session = sample.get("session") == request.session
        last_seq = int(sample["seq"]) if same_session and "seq" in sample else None
        applied = []
        for snapshot in ordered:
            if last_seq is not None and snapshot.seq <= last_seq:
                continue
            sample = snapshots.apply_snapshot(sample, snapshot.model_dump(), now)
            sample["session"], sample["seq"] = request.session, snapshot.seq
            last_seq = snapshot.seq
            applied.append(sample)
        if not applied:
            break
        expires = _expires_at(settings, now)
        new_state = {
            **sample,
            "job_id": job_id,
            "metric_key": state_key,
            "replica_id": replica_id,
            "version": version + 1,
            "expires_at": expires,
        }
        if request.dropped_snapshots:
            new_state["dropped_snapshots"] = request.dropped_snapshots
        items: list[dict[str, Any]] = [
            {
                "Put": {
                    "TableName": settings.metrics_table,
                    "Item": dynamo.serialize(new_state),
                    "ConditionExpression": "attribute_not_exists(metric_key) OR version = :v",
                    "ExpressionAttributeValues": {":v": {"N": str(version)}},
                }
            },
            {
                "ConditionCheck": {
                    "TableName": settings.metrics_table,
                    "Key": _key(job_id, FINAL_PREFIX + replica_id),
                    "ConditionExpression": "attribute_not_exists(metric_key)",
                }
            },
        ]
        for row in applied:
            item = {
                **_sample_of(row),
                "job_id": job_id,
                "metric_key": series_key(float(row["timestamp"]), replica_id, int(row["seq"])),
                "replica_id": replica_id,
                "expires_at": expires,
            }
            items.append(
                {"Put": {"TableName": settings.metrics_table, "Item": dynamo.serialize(item)}}
            )
        try:
            client.transact_write_items(TransactItems=items)
        except ClientError as error:
            if not dynamo.is_transaction_cancelled(error):
                raise
            codes = dynamo.cancellation_codes(error)
            if len(codes) > 1 and codes[1] == "ConditionalCheckFailed":
                raise Conflict(
                    f"replica {replica_id!r} has finished; its metrics are closed and further "
                    "snapshots are not counted",
                    replica_id=replica_id,
                ) from error
            logger.info(
                "metrics ingest raced another write of the same replica, retrying",
                extra={"job_id": job_id, "replica_id": replica_id, "attempt": attempt + 1},
            )
            continue
        break
    else:
        raise Conflict(
            f"metrics of replica {replica_id!r} changed concurrently {MAX_WRITE_ATTEMPTS} times; "
            "send the snapshots again"
        )
    _heartbeat(settings, job_id, replica_id)
    if applied:
        observability.count(observability.SNAPSHOTS_INGESTED, len(applied))
    if request.dropped_snapshots:
        logger.warning(
            "replica dropped metric snapshots it could not send",
            extra={
                "job_id": job_id,
                "replica_id": replica_id,
                "dropped_snapshots": request.dropped_snapshots,
            },
        )
    return {
        "ok": True,
        "ingested": len(applied),
        "duplicates": len(ordered) - len(applied),
    }


def _heartbeat(settings: Settings, job_id: str, replica_id: str) -> None:
    """Writes the replica's heartbeat (server time) and moves a starting or dead replica to running."""
    from chalicelib import replicas  # replicas imports state_events, which imports this module

    try:
        response = aws.client("dynamodb").update_item(
            TableName=settings.replicas_table,
            Key={"job_id": {"S": job_id}, "replica_id": {"S": replica_id}},
            UpdateExpression="SET last_heartbeat = :now",
            ConditionExpression="attribute_exists(replica_id)",
            ExpressionAttributeValues={":now": dynamo.serialize_value(time.time())},
            ReturnValues="ALL_NEW",
        )
    except ClientError as error:
        if dynamo.is_condition_failure(error):
            return
        raise
    phase = (response.get("Attributes") or {}).get("phase", {}).get("S")
    if phase and ReplicaPhase(phase) in _MOVES_TO_RUNNING:
        try:
            replicas.transition_replica(
                settings, job_id, replica_id, ReplicaPhase.RUNNING, reason="metrics arrived"
            )
        except Conflict:
            # Another request moved the replica first; its phase is decided there.
            pass


# Retirement.


def retire_replica(settings: Settings, job_id: str, replica_id: str) -> bool:
    """Folds a finished replica's counters and histograms into the job's retired totals.

    One transaction adds them to ``state~retired``, deletes the replica's state item and keeps
    its last sample as ``final#<replica>``, so a counter is never counted twice or lost. Returns
    False when the replica has no state item (it sent no metrics, or was retired already).
    """
    client = aws.client("dynamodb")
    for _ in range(MAX_WRITE_ATTEMPTS * 2):
        state = _get(settings, job_id, STATE_PREFIX + replica_id)
        if state is None:
            return False
        retired = _get(settings, job_id, RETIRED_KEY)
        retired_version = int(retired.get("version", 0)) if retired else 0
        now = time.time()
        folded = snapshots.fold_into_retired(
            _sample_of(retired) if retired else None, _sample_of(state), replica_id
        )
        expires = _expires_at(settings, now)
        new_retired = {
            **folded,
            "job_id": job_id,
            "metric_key": RETIRED_KEY,
            "version": retired_version + 1,
            "updated_at": now,
            "expires_at": expires,
        }
        final = {
            **_sample_of(state),
            "job_id": job_id,
            "metric_key": FINAL_PREFIX + replica_id,
            "retired_at": now,
            "expires_at": expires,
        }
        items = [
            {
                "Put": {
                    "TableName": settings.metrics_table,
                    "Item": dynamo.serialize(new_retired),
                    "ConditionExpression": "attribute_not_exists(metric_key) OR version = :v",
                    "ExpressionAttributeValues": {":v": {"N": str(retired_version)}},
                }
            },
            {
                "Delete": {
                    "TableName": settings.metrics_table,
                    "Key": _key(job_id, STATE_PREFIX + replica_id),
                    "ConditionExpression": "version = :v",
                    "ExpressionAttributeValues": {":v": {"N": str(int(state.get("version", 0)))}},
                }
            },
            {"Put": {"TableName": settings.metrics_table, "Item": dynamo.serialize(final)}},
        ]
        try:
            client.transact_write_items(TransactItems=items)
        except ClientError as error:
            if dynamo.is_transaction_cancelled(error):
                continue
            raise
        logger.info("replica metrics retired", extra={"job_id": job_id, "replica_id": replica_id})
        return True
    raise Conflict(f"metrics of replica {replica_id!r} kept changing while retiring them")


# Reads.


def job_samples(
    settings: Settings, job_id: str
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Returns the active replicas' samples and the retired totals, in one Query."""
    items = _query(
        settings,
        {
            "KeyConditionExpression": "job_id = :job AND begins_with(metric_key, :prefix)",
            "ExpressionAttributeValues": {":job": {"S": job_id}, ":prefix": {"S": "state"}},
        },
    )
    retired = next((_sample_of(i) for i in items if i["metric_key"] == RETIRED_KEY), None)
    samples = [_sample_of(i) for i in items if i["metric_key"].startswith(STATE_PREFIX)]
    return samples, retired


def job_metrics(settings: Settings, job_id: str) -> dict[str, Any]:
    """Returns the job snapshot; raises NotFound before any replica has sent metrics."""
    samples, retired = job_samples(settings, job_id)
    if not samples and retired is None:
        raise NotFound(
            f"no metrics for job {job_id!r}: the job does not exist or no replica has sent "
            "metrics yet (replicas send them every 5 s once their engine is up)",
            job_id=job_id,
        )
    return snapshots.job_snapshot(job_id, samples, retired, time.time())


def replica_metrics(settings: Settings, job_id: str, replica_id: str) -> dict[str, Any]:
    """Returns one replica's snapshot, also after it finished (from its final sample)."""
    item = _get(settings, job_id, STATE_PREFIX + replica_id) or _get(
        settings, job_id, FINAL_PREFIX + replica_id
    )
    if item is None:
        raise NotFound(
            f"no metrics for replica {replica_id!r} of job {job_id!r}", replica_id=replica_id
        )
    return snapshots.replica_snapshot(job_id, _sample_of(item))


def replicas_with_metrics(settings: Settings, job_id: str) -> set[str]:
    """Returns ids of the job's replicas whose metrics take part in the job snapshot now."""
    items = _query(
        settings,
        {
            "KeyConditionExpression": "job_id = :job AND begins_with(metric_key, :prefix)",
            "ExpressionAttributeValues": {":job": {"S": job_id}, ":prefix": {"S": STATE_PREFIX}},
            "ProjectionExpression": "metric_key",
        },
    )
    return {item["metric_key"][len(STATE_PREFIX) :] for item in items}


def _series_rows(
    settings: Settings,
    job_id: str,
    start: float,
    end: float | None,
    *,
    limit: int | None = None,
    next_token: str | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    upper = f"{SERIES_PREFIX}{end:017.6f}~" if end is not None else f"{SERIES_PREFIX}~"
    query: dict[str, Any] = {
        "TableName": settings.metrics_table,
        "KeyConditionExpression": "job_id = :job AND metric_key BETWEEN :low AND :high",
        "ExpressionAttributeValues": {
            ":job": {"S": job_id},
            ":low": {"S": f"{SERIES_PREFIX}{max(start, 0.0):017.6f}"},
            ":high": {"S": upper},
        },
    }
    if next_token:
        query["ExclusiveStartKey"] = _decode_token(next_token)
    client = aws.client("dynamodb")
    rows: list[dict[str, Any]] = []
    while True:
        if limit is not None:
            query["Limit"] = limit - len(rows)
        page = client.query(**query)
        rows.extend(_sample_of(dynamo.deserialize(raw)) for raw in page.get("Items", []))
        last_key = page.get("LastEvaluatedKey")
        if not last_key:
            return rows, None
        if limit is not None and len(rows) >= limit:
            return rows, _encode_token(last_key)
        query["ExclusiveStartKey"] = last_key


def throughput(settings: Settings, job_id: str, window: int) -> dict[str, Any]:
    """Sustained tokens per second over the last ``window`` seconds.

    Each replica's rate is measured between its own first and last row of the window, and the
    rates are then summed, so a counter of one replica is never subtracted from another's. The
    window of each replica ends at its own newest row, so replica clock skew does not cut it.
    """
    now = time.time()
    rows, _ = _series_rows(settings, job_id, now - window - snapshots.STALE_AFTER_SECONDS, None)
    by_replica: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_replica.setdefault(row["replica_id"], []).append(row)
    per_replica = []
    for replica_id, own in sorted(by_replica.items()):
        own.sort(key=lambda r: float(r["timestamp"]))
        newest = float(own[-1]["timestamp"])
        inside = [r for r in own if newest - float(r["timestamp"]) <= window]
        if len(inside) < 2:
            continue
        first, last = inside[0], inside[-1]
        seconds = float(last["timestamp"]) - float(first["timestamp"])
        if seconds <= 0:
            continue
        totals_first = first.get("rate_totals") or {}
        totals_last = last.get("rate_totals") or {}
        per_replica.append(
            {
                "replica_id": replica_id,
                "generation_toks_per_s": round(
                    max(0.0, totals_last["generation"] - totals_first["generation"]) / seconds, 2
                ),
                "prompt_toks_per_s": round(
                    max(0.0, totals_last["prompt"] - totals_first["prompt"]) / seconds, 2
                ),
                "window_actual_sec": round(seconds, 2),
                "samples": len(inside),
            }
        )
    if not per_replica:
        raise NotFound(
            f"no throughput data for job {job_id!r} in the last {window} s: each replica needs at "
            "least two metric snapshots in the window",
            job_id=job_id,
        )
    return {
        "job_id": job_id,
        "window_sec": window,
        "window_actual_sec": max(r["window_actual_sec"] for r in per_replica),
        "generation_toks_per_s": round(sum(r["generation_toks_per_s"] for r in per_replica), 2),
        "prompt_toks_per_s": round(sum(r["prompt_toks_per_s"] for r in per_replica), 2),
        "replicas": per_replica,
    }


def timeseries(
    settings: Settings,
    job_id: str,
    *,
    start: float | None,
    end: float | None,
    step: float,
    replica_id: str | None = None,
    limit: int = 2000,
    next_token: str | None = None,
) -> dict[str, Any]:
    """Returns per-replica rows and job-level rows (one per ``step`` seconds) of a time range.

    The job-level rows of one page aggregate only the rows of that page.
    """
    rows, token = _series_rows(
        settings, job_id, start or 0.0, end, limit=limit, next_token=next_token
    )
    if replica_id is not None:
        rows = [r for r in rows if r["replica_id"] == replica_id]
    result: dict[str, Any] = {
        "status": "success",
        "job_id": job_id,
        "count": len(rows),
        "start": start,
        "end": end,
        "step_sec": step,
        "timeseries": [snapshots.replica_snapshot(job_id, row) for row in rows],
        "aggregated": snapshots.aggregate_series(job_id, rows, step),
    }
    if token:
        result["next_token"] = token
    return result


def first_row_time(settings: Settings, job_id: str) -> float | None:
    """Returns the replica timestamp of the job's earliest timeseries row."""
    page = aws.client("dynamodb").query(
        TableName=settings.metrics_table,
        KeyConditionExpression="job_id = :job AND begins_with(metric_key, :prefix)",
        ExpressionAttributeValues={":job": {"S": job_id}, ":prefix": {"S": SERIES_PREFIX}},
        ProjectionExpression="#ts",
        ExpressionAttributeNames={"#ts": "timestamp"},
        Limit=1,
    )
    items = page.get("Items") or []
    return float(dynamo.deserialize(items[0])["timestamp"]) if items else None


# Summaries.


def put_summary(settings: Settings, job_id: str, replica_id: str, metrics: dict[str, Any]) -> None:
    """Stores a replica's final summary; a second post replaces the metrics, not the time."""
    try:
        encoded = json.dumps(metrics, allow_nan=False)
    except ValueError as error:
        raise InvalidRequest(f"metrics must be finite JSON values: {error}") from error
    if len(encoded) > 64 * 1024:
        raise InvalidRequest(f"metrics summary is {len(encoded)} bytes; the limit is 65536")
    now = time.time()
    # Kept as one JSON string: a free-form map may nest deeper than DynamoDB's 32 levels, and
    # moto 5.2.5 returns a map with an empty key in a form botocore fails to parse.
    aws.client("dynamodb").update_item(
        TableName=settings.metrics_table,
        Key=_key(job_id, SUMMARY_PREFIX + replica_id),
        UpdateExpression="SET metrics_json = :m, replica_id = :r, created_at = "
        "if_not_exists(created_at, :now), updated_at = :now, expires_at = :exp",
        ExpressionAttributeValues=dynamo.serialize(
            {
                ":m": encoded,
                ":r": replica_id,
                ":now": now,
                ":exp": _expires_at(settings, now),
            }
        ),
    )


def list_summaries(settings: Settings, job_id: str) -> list[dict[str, Any]]:
    """Returns the job's replica summaries in the order they first arrived."""
    items = _query(
        settings,
        {
            "KeyConditionExpression": "job_id = :job AND begins_with(metric_key, :prefix)",
            "ExpressionAttributeValues": {":job": {"S": job_id}, ":prefix": {"S": SUMMARY_PREFIX}},
        },
    )
    items.sort(key=lambda item: float(item.get("created_at") or 0.0))
    return [
        {**json.loads(item.get("metrics_json") or "{}"), "replica_id": item["replica_id"]}
        for item in items
    ]


def _encode_token(key: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode()


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
