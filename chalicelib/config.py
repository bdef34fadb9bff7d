"""Settings read from the environment (stage variables in ``.chalice/config.json``)."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw else default


@dataclass(frozen=True)
class Settings:
    jobs_table: str
    chunks_table: str
    replicas_table: str
    bucket: str
    region: str
    # Seconds a chunk lease lasts without a renewal. Replicas renew every third of it.
    lease_seconds: int
    # Failed attempts (lease expiry or a reported error) a chunk may spend before it is `failed`.
    max_chunk_failures: int
    # Files larger than this are validated after the submit call returns: API Gateway cuts a
    # request off at 29 s, and submission reads about 39 MB/s on a 2-core x86 machine
    # (bench/ingest.py), so 256 MiB takes about 7 s there; a Lambda CPU can be slower.
    sync_validation_max_bytes: int
    # "thread" runs follow-up work (assembly, async validation) on a background thread of the
    # same process, "inline" runs it before the request returns (tests), "lambda" invokes the
    # function named in `async_function_name` with InvocationType=Event (deployed stage).
    async_mode: str
    async_function_name: str
    # Metric state, timeseries and replica summaries; its stream feeds the WebSocket push.
    metrics_table: str = "tandemn-metrics"
    # Job and replica events (transitions, launches, reclaims, swaps).
    events_table: str = "tandemn-events"
    # WebSocket connections, their job subscriptions and single-use connect tokens.
    connections_table: str = "tandemn-connections"
    # One run report per finished job.
    runs_table: str = "tandemn-runs"
    # Metric snapshots and events expire (DynamoDB TTL) this many days after they are written.
    metrics_ttl_days: int = 30
    # The Chalice stage: "local" (the local stack on 127.0.0.1, where the dashboard needs no
    # token), "test", or a deployed stage ("dev"). Unset counts as deployed.
    stage: str = "dev"
    # wss:// URL of the WebSocket API stage, which the dashboard page connects to. Empty where
    # there is none, such as the local stack, because Chalice's local server serves no WebSockets.
    websocket_url: str = ""
    # Model names this deployment's engines serve; empty means any. The local stack with
    # llama-server serves one model file, so it names that model here.
    served_models: tuple[str, ...] = ()


def load_settings() -> Settings:
    """Reads the settings on every call, so tests and the local stack can change them."""
    return Settings(
        jobs_table=os.environ.get("JOBS_TABLE", "tandemn-jobs"),
        chunks_table=os.environ.get("CHUNKS_TABLE", "tandemn-chunks"),
        replicas_table=os.environ.get("REPLICAS_TABLE", "tandemn-replicas"),
        bucket=os.environ.get("TANDEMN_BUCKET", "tandemn-local"),
        region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        lease_seconds=_int_env("TANDEMN_LEASE_SECONDS", 300),
        max_chunk_failures=_int_env("TANDEMN_MAX_CHUNK_FAILURES", 3),
        sync_validation_max_bytes=_int_env("TANDEMN_SYNC_VALIDATION_MAX_BYTES", 256 * 1024 * 1024),
        async_mode=os.environ.get("TANDEMN_ASYNC_MODE", "thread"),
        async_function_name=os.environ.get("TANDEMN_ASYNC_FUNCTION", "run_background_task"),
        metrics_table=os.environ.get("METRICS_TABLE", "tandemn-metrics"),
        events_table=os.environ.get("EVENTS_TABLE", "tandemn-events"),
        connections_table=os.environ.get("CONNECTIONS_TABLE", "tandemn-connections"),
        runs_table=os.environ.get("RUNS_TABLE", "tandemn-runs"),
        metrics_ttl_days=_int_env("TANDEMN_METRICS_TTL_DAYS", 30),
        stage=os.environ.get("TANDEMN_STAGE") or "dev",
        websocket_url=os.environ.get("TANDEMN_WEBSOCKET_URL", ""),
        served_models=tuple(
            name.strip()
            for name in os.environ.get("TANDEMN_SERVED_MODELS", "").split(",")
            if name.strip()
        ),
    )
