"""Live metrics: the WebSocket API's connections and pushes, and server-sent event bodies.

WebSocket flow: a user route (``POST /ws/token``, SigV4-signed in a deployed stage) issues a
single-use connect token that is valid for CONNECT_TOKEN_SECONDS. The client opens
``wss://<api>/<stage>?token=<token>``, and ``$connect`` accepts the connection only with a valid,
unused token. The client then sends ``{"action": "subscribe", "job_id": "..."}``. Each metrics
ingest writes a replica's state item, and the metrics table's stream invokes ``push_metrics``.
It sends the job's new snapshot to every connection subscribed to the job and deletes the items
of connections that API Gateway reports gone (GoneException).

The connections table contains, per connection id, the connection item (``topic =
"connection"``) and one item per subscription (``topic = "job#<id>"``, indexed by ``job_id``),
all with a TTL. A connect token is stored as ``connection_id = "token#<sha256 of the token>"``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Iterable
from typing import Any

from botocore.exceptions import ClientError
from chalice import WebsocketDisconnectedError

from chalicelib import aws, dynamo, metrics_store
from chalicelib.config import Settings
from chalicelib.errors import NotFound

logger = logging.getLogger(__name__)

CONNECT_TOKEN_SECONDS = 60
# API Gateway closes a WebSocket connection after 2 hours, and its items expire a little later.
CONNECTION_SECONDS = 2 * 3600 + 600
TOKEN_PREFIX = "wst_"
SSE_RETRY_MILLISECONDS = 2000
TERMINAL_STATUSES = frozenset({"succeeded", "completed_with_errors", "failed", "cancelled"})


def _token_key(token: str) -> str:
    return "token#" + hashlib.sha256(token.encode()).hexdigest()


def issue_connect_token(settings: Settings) -> dict[str, Any]:
    """Creates a single-use WebSocket connect token and stores only its SHA-256 hash."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = time.time()
    expires = now + CONNECT_TOKEN_SECONDS
    aws.client("dynamodb").put_item(
        TableName=settings.connections_table,
        Item=dynamo.serialize(
            {
                "connection_id": _token_key(token),
                "topic": "token",
                "created_at": now,
                "expires_at": int(expires) + 1,
                "valid_until": expires,
            }
        ),
    )
    return {"token": token, "expires_at": expires, "expires_in_seconds": CONNECT_TOKEN_SECONDS}


def accept_connection(
    settings: Settings, connection_id: str, api_id: str, stage: str, token: str | None
) -> bool:
    """Consumes ``token`` and stores the connection. Returns False for a missing or spent token."""
    if not token or not token.startswith(TOKEN_PREFIX) or len(token) > 100:
        return False
    client = aws.client("dynamodb")
    now = time.time()
    try:
        # Deleting the token in the same conditional write makes it single-use. DynamoDB's TTL
        # deletes expired items only eventually, so the expiry is checked here too.
        client.delete_item(
            TableName=settings.connections_table,
            Key={"connection_id": {"S": _token_key(token)}, "topic": {"S": "token"}},
            ConditionExpression="attribute_exists(connection_id) AND valid_until > :now",
            ExpressionAttributeValues={":now": dynamo.serialize_value(now)},
        )
    except ClientError as error:
        if dynamo.is_condition_failure(error):
            return False
        raise
    client.put_item(
        TableName=settings.connections_table,
        Item=dynamo.serialize(
            {
                "connection_id": connection_id,
                "topic": "connection",
                "api_id": api_id,
                "stage": stage,
                "connected_at": now,
                "expires_at": int(now + CONNECTION_SECONDS),
            }
        ),
    )
    logger.info("websocket connected", extra={"connection_id": connection_id})
    return True


def subscribe(settings: Settings, connection_id: str, job_id: str, api_id: str, stage: str) -> None:
    now = time.time()
    aws.client("dynamodb").put_item(
        TableName=settings.connections_table,
        Item=dynamo.serialize(
            {
                "connection_id": connection_id,
                "topic": f"job#{job_id}",
                "job_id": job_id,
                "api_id": api_id,
                "stage": stage,
                "subscribed_at": now,
                "expires_at": int(now + CONNECTION_SECONDS),
            }
        ),
    )
    logger.info("websocket subscribed", extra={"connection_id": connection_id, "job_id": job_id})


def unsubscribe(settings: Settings, connection_id: str, job_id: str) -> None:
    aws.client("dynamodb").delete_item(
        TableName=settings.connections_table,
        Key={"connection_id": {"S": connection_id}, "topic": {"S": f"job#{job_id}"}},
    )


def disconnect(settings: Settings, connection_id: str) -> int:
    """Deletes every item of a connection and returns how many there were."""
    client = aws.client("dynamodb")
    query: dict[str, Any] = {
        "TableName": settings.connections_table,
        "KeyConditionExpression": "connection_id = :c",
        "ExpressionAttributeValues": {":c": {"S": connection_id}},
        "ProjectionExpression": "connection_id, topic",
    }
    deleted = 0
    while True:
        page = client.query(**query)
        for key in page.get("Items", []):
            client.delete_item(TableName=settings.connections_table, Key=key)
            deleted += 1
        if not page.get("LastEvaluatedKey"):
            break
        query["ExclusiveStartKey"] = page["LastEvaluatedKey"]
    logger.info("websocket connection removed", extra={"connection_id": connection_id})
    return deleted


def subscribers(settings: Settings, job_id: str) -> list[dict[str, Any]]:
    client = aws.client("dynamodb")
    query: dict[str, Any] = {
        "TableName": settings.connections_table,
        "IndexName": "subscribers_by_job",
        "KeyConditionExpression": "job_id = :job",
        "ExpressionAttributeValues": {":job": {"S": job_id}},
    }
    found = []
    while True:
        page = client.query(**query)
        found.extend(dynamo.deserialize(item) for item in page.get("Items", []))
        if not page.get("LastEvaluatedKey"):
            return found
        query["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def jobs_in_stream(records: Iterable[Any]) -> list[str]:
    """Returns the jobs whose replica state changed in a batch of metrics-table stream records."""
    job_ids: list[str] = []
    for record in records:
        if record.event_name not in ("INSERT", "MODIFY"):
            continue
        keys = record.keys or {}
        metric_key = (keys.get("metric_key") or {}).get("S", "")
        job_id = (keys.get("job_id") or {}).get("S")
        if job_id and metric_key.startswith("state") and job_id not in job_ids:
            job_ids.append(job_id)
    return job_ids


def metrics_message(job_id: str, snapshot: dict[str, Any]) -> str:
    return json.dumps({"type": "metrics", "job_id": job_id, "snapshot": snapshot})


def send_or_forget(
    settings: Settings, websocket_api: Any, subscriber: dict[str, Any], message: str
) -> bool:
    """Sends ``message`` and returns True. A connection that is gone loses its items (False)."""
    websocket_api.configure_from_api_id(subscriber["api_id"], subscriber["stage"])
    try:
        websocket_api.send(subscriber["connection_id"], message)
    except WebsocketDisconnectedError:
        disconnect(settings, subscriber["connection_id"])
        return False
    return True


def push_metrics(settings: Settings, websocket_api: Any, job_ids: list[str]) -> dict[str, int]:
    """Sends each job's current snapshot to the connections subscribed to it."""
    sent = gone = 0
    for job_id in job_ids:
        targets = subscribers(settings, job_id)
        if not targets:
            continue
        try:
            snapshot = metrics_store.job_metrics(settings, job_id)
        except NotFound:
            continue
        message = metrics_message(job_id, snapshot)
        for subscriber in targets:
            if send_or_forget(settings, websocket_api, subscriber, message):
                sent += 1
            else:
                gone += 1
    if sent or gone:
        logger.info("metrics pushed", extra={"jobs": len(job_ids), "sent": sent, "gone": gone})
    return {"sent": sent, "gone": gone}


def sse_body(job_id: str, job_status: str | None, snapshot: dict[str, Any] | None) -> str:
    """Builds one server-sent events response: the retry delay, the snapshot, the job status.

    API Gateway buffers a whole response, so each response carries the current events and ends.
    An EventSource reconnects after ``retry`` milliseconds and gets the next ones.
    """
    now = time.time()
    lines = [f"retry: {SSE_RETRY_MILLISECONDS}", ""]
    if snapshot is not None:
        lines += [f"id: {now:.3f}", "event: metrics", f"data: {json.dumps(snapshot)}", ""]
    status = {"job_id": job_id, "job_status": job_status}
    lines += ["event: status", f"data: {json.dumps(status)}", ""]
    if job_status in TERMINAL_STATUSES:
        lines += ["event: end", f"data: {json.dumps(status)}", ""]
    return "\n".join(lines) + "\n"
