"""The job store: one DynamoDB item per job holding its status, input statistics and the chunk
counters that every chunk transition updates in the same transaction.

Invariant: ``pending + inflight + completed + failed == total_chunks`` once the job is queued,
so ``/chunks/progress`` is a single ``GetItem`` and always exact.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import secrets
import time
from typing import Any

from botocore.exceptions import ClientError

from chalicelib import aws, deadline, dynamo, state_events
from chalicelib.config import Settings
from chalicelib.errors import Conflict, InvalidRequest, NotFound
from chalicelib.models import ID_RE
from chalicelib.states import JOB_STATUS_RANK, JOB_TERMINAL, JobStatus, job_sources_for

logger = logging.getLogger(__name__)

LISTING_KEY = "job"
ACTIVE_KEY = "active"
MAX_LIST_LIMIT = 200


def new_job_id(model_name: str) -> str:
    """Builds a readable id from the model name: ``Qwen/Qwen2.5-72B`` -> ``qwen2-5-72b-1a2b3c4d``."""
    tail = model_name.rsplit("/", 1)[-1].lower()
    slug = re.sub(r"[^a-z0-9]+", "-", tail).strip("-")[:40].strip("-") or "job"
    return f"{slug}-{secrets.token_hex(4)}"


def output_prefix(settings: Settings, job_id: str) -> str:
    return f"jobs/{job_id}/"


def get_job(settings: Settings, job_id: str, *, consistent: bool = True) -> dict[str, Any]:
    response = aws.client("dynamodb").get_item(
        TableName=settings.jobs_table,
        Key={"job_id": {"S": job_id}},
        ConsistentRead=consistent,
    )
    item = dynamo.deserialize(response.get("Item"))
    if item is None:
        raise NotFound(f"job {job_id!r} not found", job_id=job_id)
    return item


def put_new_job(settings: Settings, item: dict[str, Any]) -> None:
    try:
        aws.client("dynamodb").put_item(
            TableName=settings.jobs_table,
            Item=dynamo.serialize(item),
            ConditionExpression="attribute_not_exists(job_id)",
        )
    except ClientError as error:
        if dynamo.is_condition_failure(error):
            raise Conflict(f"job {item['job_id']!r} already exists") from error
        raise


def base_job_item(job_id: str, status: JobStatus, fields: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    item = {
        "job_id": job_id,
        "listing": LISTING_KEY,
        "active": ACTIVE_KEY,
        "status": status.value,
        "created_at": now,
        "updated_at": now,
        "total_chunks": 0,
        "pending": 0,
        "inflight": 0,
        "completed": 0,
        "failed": 0,
        "next_chunk_index": 0,
        "replica_version": 0,
    }
    item.update(fields)
    return item


def transition_job(
    settings: Settings,
    job_id: str,
    target: JobStatus,
    *,
    extra_set: dict[str, Any] | None = None,
    strict: bool = True,
    sources: list[JobStatus] | None = None,
) -> bool:
    """Moves a job to ``target`` if the state machine allows it from its current status.

    With ``strict=False`` a refused move (the job is already past ``target``) returns False
    instead of raising, which is what replica phase reports need: status never moves backwards.
    ``sources`` narrows the statuses the move is allowed from; each must be an allowed source.
    """
    allowed = job_sources_for(target)
    if sources is not None and not set(sources) <= set(allowed):
        raise ValueError(f"a job cannot move to {target.value!r} from {sorted(sources)}")
    sources = allowed if sources is None else list(sources)
    names = {"#status": "status", "#updated": "updated_at"}
    values: dict[str, Any] = {":target": target.value, ":now": time.time()}
    placeholders = []
    for i, source in enumerate(sources):
        values[f":s{i}"] = source.value
        placeholders.append(f":s{i}")
    set_parts = ["#status = :target", "#updated = :now"]
    for i, (name, value) in enumerate((extra_set or {}).items()):
        names[f"#x{i}"] = name
        values[f":x{i}"] = value
        set_parts.append(f"#x{i} = :x{i}")
    expression = "SET " + ", ".join(set_parts)
    if target in JOB_TERMINAL:
        names["#active"] = "active"
        expression += " REMOVE #active"
    try:
        aws.client("dynamodb").update_item(
            TableName=settings.jobs_table,
            Key={"job_id": {"S": job_id}},
            UpdateExpression=expression,
            ConditionExpression=f"attribute_exists(job_id) AND #status IN ({', '.join(placeholders)})",
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=dynamo.serialize(values),
        )
    except ClientError as error:
        if not dynamo.is_condition_failure(error):
            raise
        if strict:
            current = get_job(settings, job_id)["status"]
            raise Conflict(
                f"job {job_id!r} cannot move from {current!r} to {target.value!r}",
                job_id=job_id,
                current_status=current,
            ) from error
        return False
    logger.info("job status changed", extra={"job_id": job_id, "status": target.value})
    state_events.job_transitioned(settings, job_id, target.value)
    return True


def progress_of(job: dict[str, Any]) -> dict[str, Any]:
    total = int(job.get("total_chunks", 0))
    completed = int(job.get("completed", 0))
    failed = int(job.get("failed", 0))
    return {
        "total": total,
        "pending": int(job.get("pending", 0)),
        "inflight": int(job.get("inflight", 0)),
        "completed": completed,
        "failed": failed,
        "all_done": total > 0 and completed + failed >= total,
    }


def job_view(settings: Settings, job: dict[str, Any]) -> dict[str, Any]:
    """Shapes a job item for ``GET /job/{id}``."""
    progress = progress_of(job)
    total = progress["total"]
    fraction = (progress["completed"] + progress["failed"]) / total if total else 0.0
    prefix = f"s3://{settings.bucket}/{output_prefix(settings, job['job_id'])}"
    view = {
        "job_id": job["job_id"],
        "status": job["status"],
        "progress": round(fraction, 4),
        "model_name": job.get("model_name"),
        "num_lines": job.get("num_requests", 0),
        "description": job.get("description"),
        "user_id": job.get("user_id"),
        "input_file": job.get("input_file"),
        "created_at": job.get("created_at"),
        "last_updated_at": job.get("updated_at"),
        "chunks": progress,
        "input_stats": job.get("input_stats"),
        "requested": job.get("requested"),
        "output_location": prefix,
        "output_file": job.get("output_file"),
        "error_file": job.get("error_file"),
        "requests_succeeded": job.get("requests_succeeded"),
        "requests_failed": job.get("requests_failed"),
        # Set on a cancelled job once its teardown has assembled what completed.
        "requests_cancelled": job.get("requests_cancelled"),
        # Reported by replicas as chunks complete; the final counts above come from assembly.
        "requests_done": int(job.get("live_requests_succeeded", 0))
        + int(job.get("live_requests_failed", 0)),
        "generation_tokens_total": int(job.get("generation_tokens_total", 0)),
        "prompt_tokens_total": int(job.get("prompt_tokens_total", 0)),
        "finished_at": job.get("finished_at"),
    }
    if job.get("validation_errors"):
        view["validation_errors"] = job["validation_errors"]
    if job.get("failure_reason"):
        view["failure_reason"] = job["failure_reason"]
    for key in ("cancel_reason", "cancelled_at"):
        if job.get(key) is not None:
            view[key] = job[key]
    # Ranked placements from the solver at submit (chalicelib/placement.py), best first.
    for key in ("placement_solver", "placements", "placement_warning"):
        if job.get(key):
            view[key] = job[key]
    view["deadline"] = deadline_view(job)
    return view


# Statuses whose work ran to the end, so the finish time can be compared with the deadline. A
# cancelled or failed job did not finish its work, so it neither met nor missed its deadline.
FINISHED_WORK = frozenset({JobStatus.SUCCEEDED, JobStatus.COMPLETED_WITH_ERRORS})


def deadline_view(job: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """Builds the job's deadline: when it falls, the projected finish and by how much it was missed.

    A running job gets the projection of ``chalicelib/deadline.py`` and, once the deadline has
    passed, ``overdue_sec``. A job that finished its work gets ``missed_by_sec``, zero when it
    finished in time.
    """
    now = time.time() if now is None else now
    projection = deadline.project(job, now)
    view: dict[str, Any] = {"deadline_at": round(projection.deadline_at, 3)}
    status = JobStatus(job["status"])
    if status in JOB_TERMINAL:
        finished_at = job.get("finished_at")
        if status in FINISHED_WORK and finished_at is not None:
            view["missed_by_sec"] = round(max(0.0, float(finished_at) - projection.deadline_at), 1)
        return view
    finish = projection.projected_finish_at
    view["projected_finish_at"] = None if finish is None else round(finish, 3)
    view["at_risk"] = projection.at_risk
    if now > projection.deadline_at:
        view["overdue_sec"] = round(now - projection.deadline_at, 1)
    return view


def job_warnings(view: dict[str, Any]) -> list[str]:
    """Lists what a user should act on in a job view that carries its ``cost`` object.

    A job with work left and no replica running or starting makes no progress until one is
    added, and a missed or threatened deadline is stated with its size.
    """
    warnings = []
    job_id = view["job_id"]
    chunks = view["chunks"]
    waiting = chunks["pending"] + chunks["inflight"]
    terminal = JobStatus(view["status"]) in JOB_TERMINAL
    # A validating job has no chunks to lease yet, and an assembling one needs no replica.
    needs_replica = view["status"] not in (JobStatus.VALIDATING.value, JobStatus.ASSEMBLING.value)
    if not terminal and needs_replica and waiting and view["cost"]["num_running_replicas"] == 0:
        warnings.append(
            f"no replica is running or starting, so {waiting} chunks wait; add one with "
            f"`tandemn add {job_id}` (POST /job/{job_id}/scale)"
        )
    schedule = view["deadline"]
    if schedule.get("missed_by_sec"):
        warnings.append(f"finished {schedule['missed_by_sec'] / 3600:.2f} h after its deadline")
    elif schedule.get("overdue_sec"):
        warnings.append(
            f"its deadline passed {schedule['overdue_sec'] / 3600:.2f} h ago and it is still running"
        )
    elif schedule.get("at_risk") and schedule.get("projected_finish_at") is not None:
        # Before its deadline a job is at risk only through a projection, so one exists here.
        behind = (schedule["projected_finish_at"] - schedule["deadline_at"]) / 3600
        warnings.append(f"at its current pace it finishes {behind:.2f} h after its deadline")
    return warnings


def _encode_page_token(key: dict[str, Any]) -> str:
    plain = {"job_id": key["job_id"]["S"], "created_at": key["created_at"]["N"]}
    return base64.urlsafe_b64encode(json.dumps(plain).encode()).decode()


def _decode_page_token(token: str) -> dict[str, Any]:
    """Rebuilds the index key from a token; any other shape is rejected, never sent to DynamoDB."""
    invalid = InvalidRequest(
        f"next_token {token[:40]!r} is not a token this API returned; omit it for the first page",
        field="next_token",
    )
    try:
        plain = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, UnicodeDecodeError) as error:
        raise invalid from error
    if not isinstance(plain, dict) or set(plain) != {"job_id", "created_at"}:
        raise invalid
    job_id, created_at = plain["job_id"], plain["created_at"]
    if not isinstance(job_id, str) or not ID_RE.match(job_id) or not isinstance(created_at, str):
        raise invalid
    try:
        float(created_at)
    except ValueError as error:
        raise invalid from error
    return {
        "job_id": {"S": job_id},
        "listing": {"S": LISTING_KEY},
        "created_at": {"N": created_at},
    }


def list_jobs(settings: Settings, limit: int, next_token: str | None) -> dict[str, Any]:
    """Lists jobs newest first through the ``jobs_by_created`` index, one page at a time."""
    client = aws.client("dynamodb")
    query: dict[str, Any] = {
        "TableName": settings.jobs_table,
        "IndexName": "jobs_by_created",
        "KeyConditionExpression": "listing = :listing",
        "ExpressionAttributeValues": {":listing": {"S": LISTING_KEY}},
        "ScanIndexForward": False,
        "Limit": limit,
    }
    if next_token:
        query["ExclusiveStartKey"] = _decode_page_token(next_token)
    page = client.query(**query)
    keys = [{"job_id": item["job_id"]} for item in page.get("Items", [])]
    jobs_by_id: dict[str, dict[str, Any]] = {}
    # BatchGetItem takes at most 100 keys a call.
    for start in range(0, len(keys), 100):
        request = {settings.jobs_table: {"Keys": keys[start : start + 100]}}
        while request:
            response = client.batch_get_item(RequestItems=request)
            for raw in response.get("Responses", {}).get(settings.jobs_table, []):
                item = dynamo.deserialize(raw)
                jobs_by_id[item["job_id"]] = item
            request = response.get("UnprocessedKeys") or {}
    jobs = []
    for key in keys:
        job = jobs_by_id.get(key["job_id"]["S"])
        if job is None:
            continue
        progress = progress_of(job)
        total = progress["total"]
        jobs.append(
            {
                "job_id": job["job_id"],
                "status": job["status"],
                "progress": round((progress["completed"] + progress["failed"]) / total, 4)
                if total
                else 0.0,
                "model_name": job.get("model_name"),
                "num_lines": job.get("num_requests", 0),
                "created_at": job.get("created_at"),
            }
        )
    result: dict[str, Any] = {"jobs": jobs}
    if page.get("LastEvaluatedKey"):
        result["next_token"] = _encode_page_token(page["LastEvaluatedKey"])
    return result


def list_active_job_ids(settings: Settings) -> list[str]:
    """Returns ids of jobs that are not terminal, from the sparse ``active_jobs`` index."""
    client = aws.client("dynamodb")
    ids: list[str] = []
    query: dict[str, Any] = {
        "TableName": settings.jobs_table,
        "IndexName": "active_jobs",
        "KeyConditionExpression": "active = :active",
        "ExpressionAttributeValues": {":active": {"S": ACTIVE_KEY}},
    }
    while True:
        page = client.query(**query)
        ids.extend(item["job_id"]["S"] for item in page.get("Items", []))
        if not page.get("LastEvaluatedKey"):
            return ids
        query["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def is_past(status: str, target: JobStatus) -> bool:
    return JOB_STATUS_RANK[JobStatus(status)] >= JOB_STATUS_RANK[target]


def touch(settings: Settings, job_id: str) -> None:
    """Sets ``updated_at`` to now, so a job retried by the watchdog is not retried again at once."""
    aws.client("dynamodb").update_item(
        TableName=settings.jobs_table,
        Key={"job_id": {"S": job_id}},
        UpdateExpression="SET updated_at = :now",
        ConditionExpression="attribute_exists(job_id)",
        ExpressionAttributeValues={":now": {"N": repr(time.time())}},
    )
