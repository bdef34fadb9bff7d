"""The web dashboard: its payload, its page and its access tokens.

``build_payload`` returns what ``GET /dashboard/poll`` sends and what each ``GET /dashboard/stream``
event carries: the recent jobs with their chunk counts, replicas, metric snapshot, cost and
latest events, the selected job's time series and the vCPU quotas. Its DynamoDB reads are
bounded. Two index queries find the newest ``RECENT_JOBS`` jobs and at most ``MAX_ACTIVE_JOBS``
active ones, and one ``BatchGetItem`` reads them. Each job that can still change costs three
queries (replicas, metric state items, the newest events), and the selected job's snapshot rows
one range query.
A job that is terminal and whose replicas all ended is ``final``: its entry is kept in this
process and read no more.

Dashboard tokens (``tdb_<claims>.<signature>``) are HMAC-SHA256-signed claims with an expiry, so
a request is verified without a table read. The signing key is one item of the connections
table, created by the first ``POST /dashboard/token`` and cached here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib import aws, cost, deadline, dynamo, jobs, metrics_store, quotas, snapshots
from chalicelib.config import Settings
from chalicelib.errors import ControlPlaneError, InvalidRequest, Unauthorized
from chalicelib.models import ID_RE
from chalicelib.states import JOB_TERMINAL, REPLICA_TERMINAL, ReplicaPhase

logger = logging.getLogger(__name__)

# Bounds of one payload.
RECENT_JOBS = 20
MAX_ACTIVE_JOBS = 30
EVENTS_PER_JOB = 15
SERIES_POINTS = 60
# Snapshot rows read for one series. When a job has more, the newest are kept: 16 replicas that
# send every 5 s fill it in about 20 minutes.
SERIES_MAX_ROWS = 4000
# Step of a series, in seconds: the smallest of these that covers the job's life in
# SERIES_POINTS steps. Sidecars send a snapshot every 5 s by default.
SERIES_STEPS = (5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 43200, 86400)
SERIES_FIELDS = (
    "t",
    "generation_toks_per_s",
    "kv_cache_usage",
    "requests_running",
    "requests_waiting",
    "gpu_sm_util_pct",
    "e2e_ms_p50",
    "e2e_ms_p95",
    "e2e_ms_p99",
    "requests_completed",
)
LATENCY_HISTOGRAM = "e2e_request_latency_seconds"
# A delta reaches back this far before `since`: a sidecar sends its snapshots up to one metrics
# interval (5 s) after taking them, so the newest steps can still change.
DELTA_REPLACE_SECONDS = 20.0
# A client whose last payload is older than this gets the full series again.
DELTA_MAX_AGE_SECONDS = 120.0
POLL_INTERVAL_MS = 2000
SSE_RETRY_MS = 3000
FINAL_CACHE_ENTRIES = 64
READ_WORKERS = 8

TOKEN_PREFIX = "tdb_"
DEFAULT_TOKEN_SECONDS = 3600
MIN_TOKEN_SECONDS = 60
MAX_TOKEN_SECONDS = 12 * 3600
MAX_TOKEN_LENGTH = 1024
KEY_CONNECTION_ID = "dashboard#signing-key"
KEY_TOPIC = "key"
KEY_CACHE_SECONDS = 300.0
# The stage whose API listens on 127.0.0.1 only (the local stack), so no token is needed there.
OPEN_STAGE = "local"

# Replica phases grouped into the colours the page shows.
PHASE_GROUPS = {
    ReplicaPhase.REGISTERED: "launching",
    ReplicaPhase.LAUNCHING: "launching",
    ReplicaPhase.LOADING_MODEL: "launching",
    ReplicaPhase.MODEL_READY: "running",
    ReplicaPhase.RUNNING: "running",
    ReplicaPhase.DRAINING: "draining",
    ReplicaPhase.PREEMPTING: "draining",
    ReplicaPhase.COMPLETED: "completed",
    ReplicaPhase.FAILED: "failed",
    ReplicaPhase.DEAD: "failed",
    ReplicaPhase.KILLED: "killed",
    ReplicaPhase.SWAPPED_OUT: "swapped_out",
}
SNAPSHOT_FIELDS = (
    "timestamp",
    "avg_generation_throughput_toks_per_s",
    "avg_prompt_throughput_toks_per_s",
    "gpu_cache_usage_perc",
    "num_requests_running",
    "num_requests_waiting",
    "num_requests_swapped",
    "request_success_total",
    "num_preemptions_total",
    "generation_tokens_total",
    "prompt_tokens_total",
    "live_gen_tokens_total",
    "ttft_ms_p50",
    "ttft_ms_p95",
    "ttft_ms_p99",
    "tpot_ms_p50",
    "tpot_ms_p95",
    "e2e_ms_p50",
    "e2e_ms_p95",
    "e2e_ms_p99",
    "gpu_sm_util_pct",
    "gpu_mem_bw_util_pct",
)
REPLICA_FIELDS = (
    "replica_id",
    "phase",
    "provider",
    "instance_type",
    "gpu_type",
    "tp_size",
    "pp_size",
    "market",
    "region",
    "version",
    "chunks_completed",
    "last_heartbeat",
)

_final_lock = threading.Lock()
_final_entries: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
_key_lock = threading.Lock()
_key_cache: dict[str, tuple[float, str, bytes]] = {}


def clear_caches() -> None:
    """Forgets final job entries and the signing key (tests start fresh accounts)."""
    with _final_lock:
        _final_entries.clear()
    with _key_lock:
        _key_cache.clear()


# Tokens.


def token_required(settings: Settings) -> bool:
    return settings.stage != OPEN_STAGE


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signing_key(settings: Settings, *, create: bool, refresh: bool = False) -> tuple[str, bytes]:
    """Returns the key id and key, creating the key item on first use when ``create``."""
    table = settings.connections_table
    now = time.monotonic()
    with _key_lock:
        cached = _key_cache.get(table)
    if cached is not None and cached[0] > now and not refresh:
        return cached[1], cached[2]
    client = aws.client("dynamodb")
    key = {"connection_id": {"S": KEY_CONNECTION_ID}, "topic": {"S": KEY_TOPIC}}
    item = dynamo.deserialize(
        client.get_item(TableName=table, Key=key, ConsistentRead=True).get("Item")
    )
    if item is None:
        if not create:
            raise Unauthorized(
                "dashboard token is not valid: no dashboard token was ever issued by this "
                "stage; get one with `tandemn web` or POST /dashboard/token"
            )
        candidate = {
            "connection_id": KEY_CONNECTION_ID,
            "topic": KEY_TOPIC,
            "key_id": secrets.token_hex(4),
            "key": _b64encode(secrets.token_bytes(32)),
            "created_at": time.time(),
        }
        try:
            # The item has no expires_at, so the table's TTL never deletes it. When two first
            # requests race, the condition keeps the first key and the second reads it.
            client.put_item(
                TableName=table,
                Item=dynamo.serialize(candidate),
                ConditionExpression="attribute_not_exists(connection_id)",
            )
            item = candidate
            logger.info("dashboard signing key created", extra={"key_id": candidate["key_id"]})
        except ClientError as error:
            if not dynamo.is_condition_failure(error):
                raise
            item = dynamo.deserialize(
                client.get_item(TableName=table, Key=key, ConsistentRead=True)["Item"]
            )
    key_id, secret = str(item["key_id"]), _b64decode(str(item["key"]))
    with _key_lock:
        _key_cache[table] = (now + KEY_CACHE_SECONDS, key_id, secret)
    return key_id, secret


def _signature(secret: bytes, claims_text: str) -> str:
    return _b64encode(
        hmac.new(secret, (TOKEN_PREFIX + claims_text).encode(), hashlib.sha256).digest()
    )


def issue_token(
    settings: Settings, ttl_seconds: int = DEFAULT_TOKEN_SECONDS, principal: str | None = None
) -> dict[str, Any]:
    """Signs a dashboard token valid for ``ttl_seconds``; ``principal`` is the IAM caller."""
    if not MIN_TOKEN_SECONDS <= ttl_seconds <= MAX_TOKEN_SECONDS:
        raise InvalidRequest(
            f"ttl_seconds {ttl_seconds} is out of range; use {MIN_TOKEN_SECONDS} to "
            f"{MAX_TOKEN_SECONDS}",
            field="ttl_seconds",
        )
    key_id, secret = _signing_key(settings, create=True)
    now = int(time.time())
    claims = {"v": 1, "kid": key_id, "iat": now, "exp": now + ttl_seconds, "sub": principal}
    claims_text = _b64encode(json.dumps(claims, separators=(",", ":")).encode())
    token = f"{TOKEN_PREFIX}{claims_text}.{_signature(secret, claims_text)}"
    logger.info(
        "dashboard token issued", extra={"principal": principal, "expires_at": claims["exp"]}
    )
    return {
        "token": token,
        "expires_at": claims["exp"],
        "expires_in_seconds": ttl_seconds,
        "dashboard_path": f"/dashboard?token={token}",
    }


def verify_token(settings: Settings, token: str | None, now: float | None = None) -> dict[str, Any]:
    """Returns the claims of a valid token; raises Unauthorized (401) naming what is wrong."""
    how_to = "get a new one with `tandemn web` or POST /dashboard/token"
    if not token:
        raise Unauthorized(
            "the dashboard needs a token in this stage: run `tandemn web`, or POST /dashboard/token "
            "(IAM-signed) and open /dashboard?token=<token>"
        )
    if len(token) > MAX_TOKEN_LENGTH or not token.startswith(TOKEN_PREFIX) or token.count(".") != 1:
        raise Unauthorized(
            f"dashboard token is malformed (expected tdb_<claims>.<signature>); {how_to}"
        )
    claims_text, signature = token[len(TOKEN_PREFIX) :].split(".")
    try:
        claims = json.loads(_b64decode(claims_text))
        expires = float(claims["exp"])
        key_id = str(claims["kid"])
    except (ValueError, KeyError, TypeError) as error:
        raise Unauthorized(f"dashboard token is malformed (unreadable claims); {how_to}") from error
    current_id, secret = _signing_key(settings, create=False)
    if key_id != current_id:
        # The key may have been replaced since this process cached it.
        current_id, secret = _signing_key(settings, create=False, refresh=True)
    if key_id != current_id or not hmac.compare_digest(signature, _signature(secret, claims_text)):
        raise Unauthorized(
            "dashboard token is not valid: its signature does not match this stage's signing key "
            f"(the key may have been replaced); {how_to}"
        )
    now = time.time() if now is None else now
    if expires <= now:
        moment = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires))
        raise Unauthorized(f"dashboard token expired at {moment}; {how_to}", expired_at=expires)
    return claims


def request_token(headers: Any, query_params: dict[str, str] | None) -> str | None:
    """Returns the token of ``?token=`` or of ``Authorization: Bearer tdb_...``."""
    token = (query_params or {}).get("token")
    if token:
        return token
    authorization = (headers or {}).get("authorization") or ""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip().startswith(TOKEN_PREFIX):
        return value.strip()
    return None


def authorize(settings: Settings, headers: Any, query_params: dict[str, str] | None) -> None:
    """Checks a dashboard request: any request in the local stage, a valid token elsewhere."""
    if not token_required(settings):
        return
    verify_token(settings, request_token(headers, query_params))


# Page.

PAGE_PATH = Path(__file__).resolve().parent / "dashboard.html"


@lru_cache(maxsize=1)
def _page_parts() -> tuple[str, str, str]:
    """Returns the page and the CSP hashes of its one inline script and one inline style."""
    html = PAGE_PATH.read_text(encoding="utf-8")

    def digest(open_tag: str, close_tag: str) -> str:
        start = html.index(open_tag) + len(open_tag)
        body = html[start : html.index(close_tag, start)]
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"

    return html, digest("<script>", "</script>"), digest("<style>", "</style>")


def page(settings: Settings) -> tuple[str, dict[str, str]]:
    """Returns the page's HTML with its configuration, and the response headers."""
    html, script_hash, style_hash = _page_parts()
    config = {
        "stage": settings.stage,
        "token_required": token_required(settings),
        "websocket_url": settings.websocket_url or None,
        "poll_interval_ms": POLL_INTERVAL_MS,
    }
    # The configuration is a JSON data block, which script-src does not govern; "<" is escaped
    # so that no value can close the element.
    encoded = json.dumps(config).replace("<", "\\u003c")
    html = html.replace("{{CONFIG}}", encoded, 1)
    connect = "'self'"
    if settings.websocket_url:
        connect += " " + settings.websocket_url.split("?", 1)[0]
    headers = {
        "Content-Type": "text/html; charset=utf-8",
        "Cache-Control": "no-store",
        # The token travels in the page's URL, so no Referer may carry it elsewhere.
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": (
            f"default-src 'none'; script-src {script_hash}; style-src {style_hash}; "
            f"img-src data:; connect-src {connect}; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'"
        ),
    }
    return html, headers


# Payload.


def _is_terminal_job(status: str) -> bool:
    return status in {s.value for s in JOB_TERMINAL}


def _is_terminal_replica(phase: str) -> bool:
    try:
        return ReplicaPhase(phase) in REPLICA_TERMINAL
    except ValueError:
        return False


def _recent_job_ids(settings: Settings) -> list[str]:
    """Returns the newest jobs and the active ones, newest first, without duplicates."""
    client = aws.client("dynamodb")
    found: dict[str, float] = {}
    for index, key_name, key_value, limit in (
        ("jobs_by_created", "listing", jobs.LISTING_KEY, RECENT_JOBS),
        ("active_jobs", "active", jobs.ACTIVE_KEY, MAX_ACTIVE_JOBS),
    ):
        page_items = client.query(
            TableName=settings.jobs_table,
            IndexName=index,
            KeyConditionExpression=f"{key_name} = :value",
            ExpressionAttributeValues={":value": {"S": key_value}},
            ScanIndexForward=False,
            Limit=limit,
        ).get("Items", [])
        for raw in page_items:
            item = dynamo.deserialize(raw)
            found[item["job_id"]] = float(item.get("created_at") or 0.0)
    return sorted(found, key=lambda job_id: -found[job_id])


def _get_jobs(settings: Settings, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    client = aws.client("dynamodb")
    items: dict[str, dict[str, Any]] = {}
    # BatchGetItem takes at most 100 keys a call.
    for start in range(0, len(job_ids), 100):
        keys = [{"job_id": {"S": job_id}} for job_id in job_ids[start : start + 100]]
        request: dict[str, Any] = {settings.jobs_table: {"Keys": keys}}
        while request:
            response = client.batch_get_item(RequestItems=request)
            for raw in response.get("Responses", {}).get(settings.jobs_table, []):
                item = dynamo.deserialize(raw)
                items[item["job_id"]] = item
            request = response.get("UnprocessedKeys") or {}
    return items


def _latest_events(settings: Settings, job_id: str) -> list[dict[str, Any]]:
    response = aws.client("dynamodb").query(
        TableName=settings.events_table,
        KeyConditionExpression="job_id = :job",
        ExpressionAttributeValues={":job": {"S": job_id}},
        ScanIndexForward=False,
        Limit=EVENTS_PER_JOB,
    )
    events = []
    for raw in reversed(response.get("Items", [])):
        item = dynamo.deserialize(raw)
        events.append(
            {
                "timestamp": item.get("timestamp"),
                "kind": item.get("kind"),
                "level": item.get("level", "info"),
                "message": str(item.get("message", ""))[:300],
                "replica_id": item.get("replica_id"),
            }
        )
    return events


def _round(value: Any, digits: int) -> Any:
    return round(value, digits) if isinstance(value, float) else value


def _job_summary(job: dict[str, Any], final: bool) -> dict[str, Any]:
    progress = jobs.progress_of(job)
    total = progress["total"]
    requested = job.get("requested") or {}
    return {
        "job_id": job["job_id"],
        "status": job["status"],
        "final": final,
        "progress": round((progress["completed"] + progress["failed"]) / total, 4)
        if total
        else 0.0,
        "model_name": job.get("model_name"),
        "description": job.get("description"),
        "num_requests": int(job.get("num_requests") or 0),
        "requests_done": int(job.get("live_requests_succeeded", 0))
        + int(job.get("live_requests_failed", 0)),
        "requests_succeeded": job.get("requests_succeeded"),
        "requests_failed": job.get("requests_failed"),
        "generation_tokens_total": int(job.get("generation_tokens_total") or 0),
        "created_at": job.get("created_at"),
        "updated_at": job.get("updated_at"),
        "finished_at": job.get("finished_at"),
        "slo_deadline_hours": requested.get("slo_deadline_hours"),
        "failure_reason": (str(job["failure_reason"])[:300] if job.get("failure_reason") else None),
    }


def _job_entry(settings: Settings, job: dict[str, Any], now: float) -> dict[str, Any]:
    """Reads one job's replicas, metric state and events and shapes its part of the payload."""
    from chalicelib import replicas as replica_store  # replicas imports modules that import this

    job_id = job["job_id"]
    replica_items = replica_store.list_replicas(settings, job_id)
    samples, retired = metrics_store.job_samples(settings, job_id)
    events = _latest_events(settings, job_id)

    snapshot = None
    if samples or retired is not None:
        full = snapshots.job_snapshot(job_id, samples, retired, now)
        snapshot = {name: _round(full.get(name), 4) for name in SNAPSHOT_FIELDS}
    rates = [
        (s.get("rates") or {}).get("generation") for s in samples if snapshots.is_fresh(s, now)
    ]
    present = [float(r) for r in rates if r is not None]
    throughput = round(sum(present), 2) if present else None
    job_cost = cost.job_cost(job, replica_items, throughput, now)
    cost_by_replica = {entry["replica_id"]: entry for entry in job_cost["replicas"]}

    nodes = []
    for item in sorted(replica_items, key=lambda r: (int(r.get("version") or 0), r["replica_id"])):
        node = {name: item.get(name) for name in REPLICA_FIELDS}
        try:
            node["group"] = PHASE_GROUPS[ReplicaPhase(item["phase"])]
        except ValueError:
            node["group"] = "launching"
        if item.get("phase_reason"):
            node["phase_reason"] = str(item["phase_reason"])[:200]
        entry = cost_by_replica.get(item["replica_id"]) or {}
        node["accrued_usd"] = entry.get("accrued_usd")
        node["price_per_hour"] = entry.get("price_per_hour")
        nodes.append({k: v for k, v in node.items() if v is not None})

    terminal = _is_terminal_job(job["status"])
    final = terminal and all(_is_terminal_replica(r["phase"]) for r in replica_items)
    projection = deadline.project(job, now)
    return {
        "job": _job_summary(job, final),
        "chunks": {k: v for k, v in jobs.progress_of(job).items() if k != "all_done"},
        "metrics": snapshot,
        "replicas": nodes,
        "cost": {
            "accrued_usd": job_cost["accrued_usd"],
            "projected_total_usd": job_cost["projected_total_usd"],
            "price_per_hour": job_cost["price_per_hour"],
            "price_known": job_cost["price_known"],
            "eta_sec": job_cost["eta_sec"],
            "num_running_replicas": job_cost["num_running_replicas"],
            "sustained_generation_toks_per_s": job_cost["sustained_generation_toks_per_s"],
            "deadline_at": round(projection.deadline_at, 3),
            "deadline_at_risk": bool(job.get("deadline_at_risk")) and not terminal,
            "projected_finish_at": None
            if projection.projected_finish_at is None or terminal
            else round(projection.projected_finish_at, 3),
            "deadline_missed_by_sec": jobs.deadline_view(job, now).get("missed_by_sec"),
        },
        "events": events,
        "final": final,
    }


def _cached_final(settings: Settings, job_id: str) -> dict[str, Any] | None:
    with _final_lock:
        entry = _final_entries.get((settings.jobs_table, job_id))
        if entry is not None:
            _final_entries.move_to_end((settings.jobs_table, job_id))
        return entry


def _remember_final(settings: Settings, job_id: str, entry: dict[str, Any]) -> None:
    with _final_lock:
        _final_entries[(settings.jobs_table, job_id)] = entry
        while len(_final_entries) > FINAL_CACHE_ENTRIES:
            _final_entries.popitem(last=False)


def series_step(duration: float) -> int:
    """Returns the smallest step that covers ``duration`` seconds in SERIES_POINTS steps."""
    for step in SERIES_STEPS:
        if step * SERIES_POINTS >= duration:
            return step
    return SERIES_STEPS[-1]


def _series_rows(
    settings: Settings, job_id: str, low: float, limit: int
) -> tuple[list[dict[str, Any]], bool]:
    """Reads the job's snapshot rows from ``low`` on, newest first, at most ``limit`` of them.

    Only the attributes the series needs are returned. Returns the rows and whether the limit
    cut older rows off.
    """
    query: dict[str, Any] = {
        "TableName": settings.metrics_table,
        "KeyConditionExpression": "job_id = :job AND metric_key BETWEEN :low AND :high",
        "ExpressionAttributeValues": {
            ":job": {"S": job_id},
            ":low": {"S": f"{metrics_store.SERIES_PREFIX}{max(low, 0.0):017.6f}"},
            ":high": {"S": f"{metrics_store.SERIES_PREFIX}~"},
        },
        "ExpressionAttributeNames": {"#ts": "timestamp", "#latency": LATENCY_HISTOGRAM},
        "ProjectionExpression": "#ts, replica_id, rates, gauges, gpu_sm_util_pct, "
        "counters.request_success, histograms.#latency",
        "ScanIndexForward": False,
    }
    client = aws.client("dynamodb")
    rows: list[dict[str, Any]] = []
    while True:
        query["Limit"] = min(1000, limit - len(rows))
        response = client.query(**query)
        rows.extend(dynamo.deserialize(raw) for raw in response.get("Items", []))
        last_key = response.get("LastEvaluatedKey")
        if not last_key:
            return rows, False
        if len(rows) >= limit:
            return rows, True
        query["ExclusiveStartKey"] = last_key


def _histogram_delta(current: dict[str, Any] | None, previous: dict[str, Any] | None) -> dict:
    buckets_now = (current or {}).get("buckets") or {}
    buckets_before = (previous or {}).get("buckets") or {}
    return {
        "buckets": {
            le: max(0.0, float(count) - float(buckets_before.get(le, 0.0)))
            for le, count in buckets_now.items()
        }
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def series_points(rows: list[dict[str, Any]], step: float, *, from_start: bool) -> list[list[Any]]:
    """Aggregates snapshot rows of all replicas into one point per step (SERIES_FIELDS).

    A point's time is the end of its step. Throughput, KV cache, running and waiting requests
    and GPU utilisation come from each replica's latest row, if it is at most
    max(STALE_AFTER_SECONDS, 2 * step) old. Completed requests and the end-to-end latency
    quantiles count the requests that finished inside the step: the difference between a
    replica's row and its previous one. A replica's first row counts from zero only when
    ``from_start`` says the rows reach back to the job's start; otherwise it only sets the base.
    """
    ordered = sorted(rows, key=lambda r: float(r["timestamp"]))
    if not ordered:
        return []
    stale_after = max(snapshots.STALE_AFTER_SECONDS, 2 * step)
    latest: dict[str, dict[str, Any]] = {}
    completed = 0.0
    latency_deltas: list[dict[str, Any]] = []
    points: list[list[Any]] = []

    def bin_end(timestamp: float) -> float:
        return math.floor(timestamp / step) * step + step

    def emit(at: float) -> None:
        fresh = [r for r in latest.values() if at - float(r["timestamp"]) <= stale_after]
        rates = [(r.get("rates") or {}).get("generation") for r in fresh]
        gauges = [r.get("gauges") or {} for r in fresh]
        merged = snapshots.merge_histograms(latency_deltas)
        buckets = (merged or {}).get("buckets") or {}

        def quantile(q: float) -> float | None:
            value = snapshots.histogram_quantile(q, buckets)
            return None if value is None else round(value * 1000.0, 1)

        def total(values: list[Any]) -> float | None:
            present = [float(v) for v in values if v is not None]
            return round(sum(present), 2) if present else None

        kv = _mean(
            [
                float(g["kv_cache_usage_perc"])
                for g in gauges
                if g.get("kv_cache_usage_perc") is not None
            ]
        )
        gpu = _mean(
            [float(r["gpu_sm_util_pct"]) for r in fresh if r.get("gpu_sm_util_pct") is not None]
        )
        points.append(
            [
                round(at, 3),
                total(rates),
                None if kv is None else round(kv, 4),
                total([g.get("num_requests_running") for g in gauges]),
                total([g.get("num_requests_waiting") for g in gauges]),
                None if gpu is None else round(gpu, 1),
                quantile(0.5),
                quantile(0.95),
                quantile(0.99),
                round(completed, 2),
            ]
        )

    boundary = bin_end(float(ordered[0]["timestamp"]))
    for row in ordered:
        timestamp = float(row["timestamp"])
        if timestamp >= boundary:
            emit(boundary)
            completed, latency_deltas = 0.0, []
            # Steps without rows are skipped, so a gap shows as a gap.
            boundary = bin_end(timestamp)
        previous = latest.get(row["replica_id"])
        if previous is not None or from_start:
            done_now = float((row.get("counters") or {}).get("request_success") or 0.0)
            done_before = float(
                ((previous or {}).get("counters") or {}).get("request_success") or 0.0
            )
            completed += max(0.0, done_now - done_before)
            latency_deltas.append(
                _histogram_delta(
                    (row.get("histograms") or {}).get(LATENCY_HISTOGRAM),
                    ((previous or {}).get("histograms") or {}).get(LATENCY_HISTOGRAM),
                )
            )
        latest[row["replica_id"]] = row
    emit(boundary)
    return points


def job_series(
    settings: Settings, job: dict[str, Any], since: float | None, now: float
) -> dict[str, Any]:
    """Returns the job's series: all of it, or with ``since`` only the steps that changed.

    The client sends the ``generated_at`` of the last payload it applied as ``since``. A delta
    holds the steps that end after ``since - DELTA_REPLACE_SECONDS``; the client replaces its
    points from the first one on. The full series comes back when the step changed since then,
    when ``since`` is too old, or when the job ended.
    """
    start = float(job.get("created_at") or now)
    terminal = _is_terminal_job(job["status"])
    end = float(job.get("finished_at") or job.get("updated_at") or now) if terminal else now
    step = series_step(end - start)
    delta = (
        since is not None
        and not terminal
        and 0 <= now - since <= DELTA_MAX_AGE_SECONDS
        and series_step(since - start) == step
    )
    if delta:
        replace_from = since - max(DELTA_REPLACE_SECONDS, 2 * step)
        low = replace_from - step - max(snapshots.STALE_AFTER_SECONDS, 2 * step)
        rows, truncated = _series_rows(settings, job["job_id"], low, SERIES_MAX_ROWS)
        points = series_points(rows, step, from_start=False)
        points = [p for p in points if p[0] > replace_from]
    else:
        # Replica clocks may run a little behind the control plane's.
        rows, truncated = _series_rows(settings, job["job_id"], start - 60.0, SERIES_MAX_ROWS)
        points = series_points(rows, step, from_start=not truncated)
    return {
        "job_id": job["job_id"],
        "mode": "delta" if delta else "full",
        "step_sec": step,
        "fields": list(SERIES_FIELDS),
        "points": points,
        "truncated": truncated,
    }


def quota_view(source: quotas.QuotaSource | None = None) -> dict[str, Any]:
    """Returns vCPU quota use per region, family and market; pools with no limit are left out."""
    try:
        view = quotas.status_view(source or quotas.source_from_env(), quotas.regions_from_env())
    except (ControlPlaneError, ClientError, BotoCoreError) as error:
        logger.warning("dashboard quota unreadable", extra={"error": str(error)})
        return {"source": None, "pools": [], "error": str(error)[:300]}
    pools = [
        {
            "region": pool["region"],
            "family": pool["family"],
            "market": pool["market"],
            "limit_vcpus": pool["limit_vcpus"],
            "used_vcpus": pool["used_vcpus"],
            **({"error": pool["error"][:200]} if pool.get("error") else {}),
        }
        for pool in view["pools"]
        if pool["limit_vcpus"] or pool["used_vcpus"] or pool.get("error")
    ]
    return {"source": view["source"], "pools": pools}


def _default_selection(summaries: list[dict[str, Any]]) -> str | None:
    for summary in summaries:
        if not _is_terminal_job(summary["status"]):
            return summary["job_id"]
    return summaries[0]["job_id"] if summaries else None


def build_payload(
    settings: Settings,
    *,
    selected: str | None = None,
    since: float | None = None,
    now: float | None = None,
    quota_source: quotas.QuotaSource | None = None,
) -> dict[str, Any]:
    """Builds the dashboard payload: every recent job, the selected job's series, the quotas.

    ``selected`` is the job whose series is read (default: the newest active job, else the
    newest job); a job that is no longer among the recent ones is added when it exists.
    """
    now = time.time() if now is None else now
    job_ids = _recent_job_ids(settings)
    if selected is not None and not ID_RE.match(selected):
        raise InvalidRequest(
            f"job {selected[:80]!r} is not a valid job id; ids use lowercase letters, digits and "
            "'-'",
            field="job",
        )
    if selected is not None and selected not in job_ids:
        job_ids.append(selected)
    entries: dict[str, dict[str, Any]] = {}
    to_read = []
    for job_id in job_ids:
        cached = _cached_final(settings, job_id)
        if cached is not None:
            entries[job_id] = cached
        else:
            to_read.append(job_id)
    items = _get_jobs(settings, to_read)
    if to_read:
        workers = max(1, min(READ_WORKERS, len(items)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            built = list(pool.map(lambda job: _job_entry(settings, job, now), items.values()))
        for entry in built:
            job_id = entry["job"]["job_id"]
            entries[job_id] = entry
            if entry["final"]:
                _remember_final(settings, job_id, entry)
    ordered = [entries[job_id] for job_id in job_ids if job_id in entries]
    summaries = [entry["job"] for entry in ordered]
    if selected not in entries:
        selected = _default_selection(summaries)

    timeseries: dict[str, Any] = {}
    if selected is not None:
        entry = entries[selected]
        series = entry.get("series")
        if series is None:
            job = items.get(selected) or jobs.get_job(settings, selected)
            series = job_series(settings, job, since, now)
            if entry["final"]:
                entry["series"] = series
        timeseries[selected] = {**series, "final": entry["final"]}

    return {
        "version": 1,
        "generated_at": round(now, 3),
        "stage": settings.stage,
        "selected": selected,
        "jobs": summaries,
        "chunks": {e["job"]["job_id"]: e["chunks"] for e in ordered},
        "metrics": {e["job"]["job_id"]: e["metrics"] for e in ordered},
        "replicas": {e["job"]["job_id"]: e["replicas"] for e in ordered},
        "cost": {e["job"]["job_id"]: e["cost"] for e in ordered},
        "events": {e["job"]["job_id"]: e["events"] for e in ordered},
        "timeseries": timeseries,
        "quota": quota_view(quota_source),
        "bounds": {
            "recent_jobs": RECENT_JOBS,
            "max_active_jobs": MAX_ACTIVE_JOBS,
            "events_per_job": EVENTS_PER_JOB,
            "series_points": SERIES_POINTS,
            "series_max_rows": SERIES_MAX_ROWS,
        },
    }


def encode(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"), default=str)


def sse_body(payload: dict[str, Any]) -> str:
    """Builds one server-sent events response: a comment, the retry delay and the payload.

    API Gateway buffers a whole response, so each response carries one event and ends; the
    browser's EventSource reconnects after ``retry`` milliseconds and sends the event id back
    as ``Last-Event-ID``, which the next response uses as ``since``.
    """
    return (
        f": tandemn dashboard {payload['generated_at']}\n"
        f"retry: {SSE_RETRY_MS}\n\n"
        f"id: {payload['generated_at']}\n"
        f"data: {encode(payload)}\n\n"
    )


def parse_since(value: str | None) -> float | None:
    """Reads ``since`` (or ``Last-Event-ID``): Unix seconds of the client's last payload."""
    if value is None or value == "":
        return None
    try:
        since = float(value)
    except ValueError as error:
        raise InvalidRequest(
            f"since {value[:40]!r} is not a number; send the generated_at of the last payload",
            field="since",
        ) from error
    if not math.isfinite(since) or since < 0:
        raise InvalidRequest(
            f"since {value[:40]!r} must be a finite time in seconds", field="since"
        )
    return since
