"""Run reports: what a finished job ran on, how long, how fast, at what latency and cost.

Assembly writes the report when the job ends (one item in the runs table, and
``jobs/<job>/report.json`` in the bucket). A replica summary that arrives after that (the
sidecars post theirs while the output is assembled) writes the report again, so the stored report
includes every summary that arrived. The run id is the job id.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib import aws, cost, dynamo, jobs, metrics_store, replicas
from chalicelib.config import Settings
from chalicelib.errors import InvalidRequest, NotFound
from chalicelib.snapshots import HISTOGRAMS, QUANTILES
from chalicelib.states import JOB_TERMINAL, JobStatus

logger = logging.getLogger(__name__)

LISTING_KEY = "run"
MAX_LIST_LIMIT = 200
REPORT_NAME = "report.json"


def _per_million(total: float | None, tokens: float) -> float | None:
    if total is None or tokens <= 0:
        return None
    return round(total / (tokens / 1_000_000), 4)


def build_report(settings: Settings, job: dict[str, Any]) -> dict[str, Any]:
    """Builds the run report of a finished job from its job, replica and metric items."""
    job_id = job["job_id"]
    replica_items = replicas.list_replicas(settings, job_id)
    try:
        snapshot: dict[str, Any] | None = metrics_store.job_metrics(settings, job_id)
    except NotFound:
        snapshot = None
    summaries = {s["replica_id"]: s for s in metrics_store.list_summaries(settings, job_id)}
    costs = cost.job_cost(job, replica_items, None)
    costs_by_replica = {entry["replica_id"]: entry for entry in costs["replicas"]}

    finished_at = float(job.get("finished_at") or job.get("updated_at") or time.time())
    created_at = float(job.get("created_at") or finished_at)
    first_metrics_at = metrics_store.first_row_time(settings, job_id)
    generation_seconds = (
        max(0.0, finished_at - first_metrics_at) if first_metrics_at is not None else None
    )
    # The tokens of the delivered output: the usage in output.jsonl, summed by assembly, else
    # the usage each completed chunk reported. Engine counters come from periodic snapshots, so
    # they count attempts that never completed up to a killed replica's last snapshot and miss
    # its work after it. llama.cpp also leaves out the prompt tokens it served from its cache (a
    # repeated 29-token prompt added 1 to its counter). So engine counters are kept apart, and
    # used only when no record had usage.
    metrics = snapshot or {}
    engine_prompt = metrics.get("prompt_tokens_total")
    engine_generation = metrics.get("generation_tokens_total")
    prompt_tokens = job.get("output_prompt_tokens")
    generation_tokens = job.get("output_generation_tokens")
    token_source = "output records"
    if not generation_tokens:
        prompt_tokens = job.get("prompt_tokens_total")
        generation_tokens = job.get("generation_tokens_total")
        token_source = "chunk completions"
    if not generation_tokens:
        prompt_tokens, generation_tokens = engine_prompt, engine_generation
        token_source = "engine"
    if generation_tokens is None:
        prompt_tokens = metrics.get("live_prompt_tokens_total")
        generation_tokens = metrics.get("live_gen_tokens_total")
        token_source = "sidecar"
    prompt_tokens = float(prompt_tokens or 0)
    generation_tokens = float(generation_tokens or 0)
    total_tokens = prompt_tokens + generation_tokens
    succeeded = int(job.get("requests_succeeded") or 0)
    failed = int(job.get("requests_failed") or 0)

    def per_second(value: float) -> float | None:
        if not generation_seconds:
            return None
        return round(value / generation_seconds, 2)

    requested = job.get("requested") or {}
    total_cost = costs["accrued_usd"] if costs["price_known"] else None
    replica_rows = []
    for item in replica_items:
        entry = costs_by_replica.get(item["replica_id"], {})
        replica_rows.append(
            {
                "replica_id": item["replica_id"],
                "phase": item.get("phase"),
                "provider": item.get("provider"),
                "region": item.get("region"),
                "market": item.get("market"),
                "instance_type": item.get("instance_type"),
                "gpu_type": item.get("gpu_type"),
                "tp_size": item.get("tp_size"),
                "pp_size": item.get("pp_size"),
                "running_seconds": entry.get("running_seconds"),
                "price_per_hour": entry.get("price_per_hour"),
                "accrued_usd": entry.get("accrued_usd"),
                "summary": summaries.get(item["replica_id"]),
            }
        )
    latency = {
        f"{prefix}_{label}": metrics.get(f"{prefix}_{label}")
        for prefix in HISTOGRAMS
        for label in QUANTILES
    }
    return {
        "run_id": job_id,
        "job_id": job_id,
        "model_name": job.get("model_name"),
        "status": job["status"],
        "configuration": {
            "chunk_size": requested.get("chunk_size"),
            "replicas_requested": requested.get("replicas"),
            "gpu_type": requested.get("gpu_type"),
            "tp_size": requested.get("tp_size"),
            "pp_size": requested.get("pp_size"),
            "max_output_tokens": requested.get("max_output_tokens"),
            "on_demand": requested.get("on_demand"),
            "placement_solver": requested.get("placement_solver"),
            "slo_deadline_hours": requested.get("slo_deadline_hours"),
        },
        "replicas": replica_rows,
        "num_replicas": len(replica_items),
        "gpu_types": sorted({r["gpu_type"] for r in replica_rows if r["gpu_type"]}),
        "instance_types": sorted({r["instance_type"] for r in replica_rows if r["instance_type"]}),
        "runtime": {
            "created_at": created_at,
            "first_metrics_at": first_metrics_at,
            "finished_at": finished_at,
            "total_runtime_sec": round(finished_at - created_at, 2),
            "generation_time_sec": None
            if generation_seconds is None
            else round(generation_seconds, 2),
        },
        "requests": {
            "total": int(job.get("num_requests") or 0),
            "succeeded": succeeded,
            "failed": failed,
            # Requests of a cancelled job that never ran, so 0 for a job that was not cancelled.
            "cancelled": int(job.get("requests_cancelled") or 0),
        },
        "tokens": {
            "prompt": int(prompt_tokens),
            "generation": int(generation_tokens),
            "total": int(total_tokens),
            "source": token_source,
        },
        "engine_tokens": None
        if engine_generation is None
        else {"prompt": int(engine_prompt or 0), "generation": int(engine_generation)},
        "throughput": {
            "output_tokens_per_sec": per_second(generation_tokens),
            "total_tokens_per_sec": per_second(total_tokens),
            "requests_per_sec": per_second(succeeded + failed),
        },
        "latency": latency,
        "cost": {key: value for key, value in costs.items() if key != "replicas"},
        "cost_usd": total_cost,
        "cost_per_million_tokens": _per_million(total_cost, total_tokens),
        "cost_per_million_output_tokens": _per_million(total_cost, generation_tokens),
        "final_metrics": snapshot,
        "report_written_at": time.time(),
    }


def write_run_report(settings: Settings, job_id: str) -> dict[str, Any] | None:
    """Builds and stores the report of a finished job; returns None while the job runs."""
    job = jobs.get_job(settings, job_id)
    if JobStatus(job["status"]) not in JOB_TERMINAL:
        return None
    report = build_report(settings, job)
    row = {
        "run_id": job_id,
        "listing": LISTING_KEY,
        "created_at": report["runtime"]["created_at"],
        "model_name": report["model_name"],
        "model_search": (report["model_name"] or "").lower(),
        "gpu_search": ",".join(report["gpu_types"]).lower(),
        "report": report,
    }
    aws.client("dynamodb").put_item(TableName=settings.runs_table, Item=dynamo.serialize(row))
    key = f"{jobs.output_prefix(settings, job_id)}{REPORT_NAME}"
    aws.client("s3").put_object(
        Bucket=settings.bucket,
        Key=key,
        Body=json.dumps(report, indent=2, default=str).encode(),
        ContentType="application/json",
    )
    logger.info("run report written", extra={"job_id": job_id, "key": key})
    return report


def write_run_report_safely(settings: Settings, job_id: str) -> None:
    """Writes the run report, logging a failure instead of raising it (the job has ended)."""
    try:
        write_run_report(settings, job_id)
    except (ClientError, BotoCoreError, NotFound):
        logger.exception("run report not written", extra={"job_id": job_id})


def _summary_row(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "run_id": report["run_id"],
        "job_id": report["job_id"],
        "model_name": report["model_name"],
        "status": report["status"],
        "created_at": report["runtime"]["created_at"],
        "finished_at": report["runtime"]["finished_at"],
        "total_runtime_sec": report["runtime"]["total_runtime_sec"],
        "num_replicas": report["num_replicas"],
        "gpu_types": report["gpu_types"],
        "instance_types": report["instance_types"],
        "requests_succeeded": report["requests"]["succeeded"],
        "requests_failed": report["requests"]["failed"],
        "prompt_tokens": report["tokens"]["prompt"],
        "generation_tokens": report["tokens"]["generation"],
        "output_tokens_per_sec": report["throughput"]["output_tokens_per_sec"],
        "cost_usd": report["cost_usd"],
        "cost_per_million_tokens": report["cost_per_million_tokens"],
    }


def list_runs(
    settings: Settings,
    *,
    model: str | None,
    gpu: str | None,
    limit: int,
    next_token: str | None,
) -> dict[str, Any]:
    """Lists runs newest first; ``model`` and ``gpu`` match case-insensitive substrings."""
    query: dict[str, Any] = {
        "TableName": settings.runs_table,
        "IndexName": "runs_by_created",
        "KeyConditionExpression": "listing = :listing",
        "ExpressionAttributeValues": {":listing": {"S": LISTING_KEY}},
        "ScanIndexForward": False,
    }
    filters = []
    if model:
        filters.append("contains(model_search, :model)")
        query["ExpressionAttributeValues"][":model"] = {"S": model.lower()}
    if gpu:
        filters.append("contains(gpu_search, :gpu)")
        query["ExpressionAttributeValues"][":gpu"] = {"S": gpu.lower()}
    if filters:
        query["FilterExpression"] = " AND ".join(filters)
    if next_token:
        query["ExclusiveStartKey"] = _decode_token(next_token)
    client = aws.client("dynamodb")
    runs: list[dict[str, Any]] = []
    last_item: dict[str, Any] | None = None
    more = False
    while True:
        # With a filter, DynamoDB applies Limit before filtering, so read fuller pages.
        query["Limit"] = max(limit, 25) if filters else limit - len(runs)
        page = client.query(**query)
        for raw in page.get("Items", []):
            if len(runs) >= limit:
                more = True
                break
            item = dynamo.deserialize(raw)
            runs.append(_summary_row(item["report"]))
            last_item = item
        if more or not page.get("LastEvaluatedKey"):
            break
        if len(runs) >= limit:
            more = True
            break
        query["ExclusiveStartKey"] = page["LastEvaluatedKey"]
    result: dict[str, Any] = {"status": "success", "count": len(runs), "runs": runs}
    if more and last_item is not None:
        # The page ends at the last run returned, wherever the filter stopped in DynamoDB's page.
        result["next_token"] = base64.urlsafe_b64encode(
            json.dumps(
                {
                    "run_id": {"S": last_item["run_id"]},
                    "listing": {"S": LISTING_KEY},
                    "created_at": dynamo.serialize_value(last_item["created_at"]),
                }
            ).encode()
        ).decode()
    return result


def get_run(settings: Settings, run_id: str) -> dict[str, Any]:
    response = aws.client("dynamodb").get_item(
        TableName=settings.runs_table, Key={"run_id": {"S": run_id}}
    )
    item = dynamo.deserialize(response.get("Item"))
    if item is None:
        raise NotFound(
            f"run {run_id!r} not found; a run report is written when its job's output is assembled",
            run_id=run_id,
        )
    return item["report"]


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
