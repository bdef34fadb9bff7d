"""Writes jobs, replicas, metric snapshots and events straight into the tables, for the dashboard's
tests and bench/dashboard_render.py: as many jobs and replicas as a test needs, without engines.

The writes go through ``chalicelib``'s clients, so they reach whatever the process's AWS clients
reach: an in-process ``mock_aws`` or a local stack's moto server (``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import time
from typing import Any

from chalicelib import aws, dynamo, events, jobs, metrics_store, snapshots
from chalicelib.config import Settings
from chalicelib.states import JobStatus

PHASES = ("running", "running", "running", "loading_model", "draining", "completed", "killed")
# Attributes of a metric state item that its timeseries rows do not carry.
_STATE_ONLY = ("recent", "session", "seq", "version", "metric_key", "expires_at")
# Bucket bounds (seconds) of vLLM's end-to-end latency histogram, a subset.
LATENCY_BOUNDS = ("0.3", "0.5", "0.8", "1.0", "1.5", "2.0", "2.5", "5.0", "10.0", "+Inf")


def seed_job(
    settings: Settings,
    index: int,
    replicas: int,
    *,
    snapshots_per_replica: int = 2,
    history_replicas: int | None = None,
    status: JobStatus = JobStatus.GENERATING,
    events_per_job: int = 16,
    now: float | None = None,
) -> str:
    """Creates one job with ``replicas`` replicas that sent metrics; returns its id."""
    now = time.time() if now is None else now
    job_id = f"seeded-model-{index:04d}-{int(now) % 100000:05d}"
    # The job starts before its oldest snapshot, 5 s apart each.
    created = now - max(600, 5 * snapshots_per_replica + 30) - index
    total_chunks = 100
    done = 40 + index
    fields: dict[str, Any] = {
        "model_name": "Qwen/Qwen2.5-7B-Instruct",
        "num_requests": total_chunks * 50,
        "total_chunks": total_chunks,
        "pending": total_chunks - done - 8,
        "inflight": 8,
        "completed": done,
        "failed": 0,
        "live_requests_succeeded": done * 50,
        "generation_tokens_total": done * 50 * 200,
        "requested": {"slo_deadline_hours": 2.0, "avg_output_tokens": 200},
        "description": f"seeded job {index}",
    }
    item = jobs.base_job_item(job_id, status, fields)
    item["created_at"] = created
    if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
        item.pop("active", None)
        item.update(pending=0, inflight=0, completed=total_chunks, finished_at=now - 5)
    jobs.put_new_job(settings, item)

    client = aws.client("dynamodb")
    for r in range(replicas):
        phase = PHASES[r % len(PHASES)] if status == JobStatus.GENERATING else "completed"
        client.put_item(
            TableName=settings.replicas_table,
            Item=dynamo.serialize(
                {
                    "job_id": job_id,
                    "replica_id": f"{job_id}-r{r}",
                    "phase": phase,
                    "provider": "ec2",
                    "instance_type": "g6e.12xlarge",
                    "gpu_type": "L40S",
                    "tp_size": 4,
                    "pp_size": 1,
                    "market": "spot" if r % 2 else "on_demand",
                    "region": ("us-east-1", "us-west-2", "eu-west-1")[r % 3],
                    "version": 1,
                    "created_at": created + 5,
                    "launched_at": created + 5,
                    "updated_at": now - 10,
                    "last_heartbeat": now - 3,
                    "chunks_completed": r + 2,
                }
            ),
        )
        # Metrics from a starting replica would move it to running.
        if phase != "loading_model":
            count = snapshots_per_replica
            if history_replicas is not None and r >= history_replicas:
                count = min(count, 2)
            _seed_metrics(settings, job_id, f"{job_id}-r{r}", count, now)
    for n in range(events_per_job):
        events.record(
            settings,
            job_id,
            events.REPLICA_PHASE,
            f"replica {job_id}-r{n % max(replicas, 1)} moved from loading_model to running",
            replica_id=f"{job_id}-r{n % max(replicas, 1)}",
        )
    return job_id


def _seed_metrics(settings: Settings, job_id: str, replica_id: str, count: int, now: float) -> None:
    """Writes ``count`` snapshots, 5 s apart and ending now, as ingest would store them.

    The items are written with ``BatchWriteItem`` instead of ``metrics_store.ingest``, because
    moto 5.2.5 copies the whole table on each ``TransactWriteItems``, which makes seeding
    thousands of rows in-process take minutes.
    """
    sample: dict[str, Any] = {"replica_id": replica_id}
    expires = int(now + settings.metrics_ttl_days * 86400)
    items = []
    for seq in range(count):
        snapshot = _snapshot(seq, now - (count - seq) * 5.0)
        sample = snapshots.apply_snapshot(sample, snapshot, now)
        row = {k: v for k, v in sample.items() if k not in _STATE_ONLY}
        items.append(
            {
                **row,
                "job_id": job_id,
                "metric_key": metrics_store.series_key(snapshot["timestamp"], replica_id, seq),
                "expires_at": expires,
            }
        )
    items.append(
        {
            **sample,
            "job_id": job_id,
            "metric_key": metrics_store.STATE_PREFIX + replica_id,
            "session": "seeded",
            "seq": count - 1,
            "version": 1,
            "expires_at": expires,
        }
    )
    client = aws.client("dynamodb")
    # BatchWriteItem takes at most 25 items a call.
    for start in range(0, len(items), 25):
        request = {
            settings.metrics_table: [
                {"PutRequest": {"Item": dynamo.serialize(item)}}
                for item in items[start : start + 25]
            ]
        }
        while request:
            request = client.batch_write_item(RequestItems=request).get("UnprocessedItems") or {}


def _snapshot(seq: int, timestamp: float) -> dict[str, Any]:
    return {
        "seq": seq,
        "timestamp": timestamp,
        "mode": "engine",
        "engine": "vllm",
        "counters": {"request_success": 3.0, "generation_tokens": 600.0, "prompt_tokens": 900.0},
        "gauges": {
            "num_requests_running": 8.0,
            "num_requests_waiting": float(seq % 4),
            "kv_cache_usage_perc": 0.35 + (seq % 10) / 40,
        },
        "histograms": {
            "e2e_request_latency_seconds": {
                "buckets": {le: float(min(3, i)) for i, le in enumerate(LATENCY_BOUNDS)},
                "sum": 4.5,
                "count": 3.0,
            }
        },
        "gpu_sm_util_pct": 60.0 + seq % 30,
    }


def seed_jobs(
    settings: Settings, count: int, replicas: int, *, history: int = 2, finished: int = 0
) -> list[str]:
    """Creates ``count`` jobs of ``replicas`` replicas each; the first one gets ``history``
    snapshots per replica and the last ``finished`` jobs have succeeded. Returns the ids,
    oldest first."""
    now = time.time()
    ids = []
    for index in range(count):
        status = JobStatus.SUCCEEDED if index >= count - finished else JobStatus.GENERATING
        ids.append(
            seed_job(
                settings,
                index,
                replicas,
                snapshots_per_replica=history if index == 0 else 2,
                # Two replicas with a long history give the series all its steps; more would
                # only slow moto's query down.
                history_replicas=2,
                status=status,
                now=now,
            )
        )
    return ids
