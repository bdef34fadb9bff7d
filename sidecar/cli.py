"""Command line of ``python -m sidecar``: options, logging, signal handling and client setup.

Every option can also be set through the environment variable named in its help. The replica
token is read only from TANDEMN_REPLICA_TOKEN, because argv is visible to every user via ``ps``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlparse

from botocore.exceptions import BotoCoreError, ClientError

from sidecar.control import ControlPlaneClient
from sidecar.engine import EngineClient
from sidecar.lifeline import Heartbeat, SpotNoticePoller, token_from_parameter
from sidecar.logs import configure_logging
from sidecar.runner import Runner
from sidecar.storage import ChunkStorage
from sidecar.telemetry import Telemetry

logger = logging.getLogger("sidecar")

TOKEN_VARIABLE = "TANDEMN_REPLICA_TOKEN"
# Name of a SecureString SSM parameter holding the token, read at start when the token variable
# is unset (EC2 instances, whose user data must not hold the token).
TOKEN_PARAMETER_VARIABLE = "TANDEMN_REPLICA_TOKEN_PARAMETER"


@dataclass(frozen=True)
class Settings:
    api_url: str
    job_id: str
    replica_id: str
    token: str = field(repr=False)
    engine_url: str
    served_model: str | None
    concurrency: int
    engine_ready_timeout: float
    drain_seconds: float
    poll_interval: float
    request_timeout: float
    max_leases: int
    log_level: str
    metrics_interval: float = 5.0
    heartbeat_interval: float = 20.0
    # Off unless set: the EC2 boot script points them at the instance metadata service.
    spot_notice_url: str | None = None
    metadata_token_url: str | None = None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _http_url(text: str) -> str:
    parsed = urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise argparse.ArgumentTypeError(f"must be an http:// or https:// URL, got {text!r}")
    return text.rstrip("/")


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sidecar",
        description=(
            "Lease chunks of a batch job from the control plane and run their requests on the "
            f"local OpenAI-compatible engine. The replica token is read from ${TOKEN_VARIABLE}."
        ),
    )

    def option(flag: str, variable: str, default: str | None, help_text: str, **kwargs) -> None:
        parser.add_argument(
            flag,
            default=environ.get(variable, default),
            help=f"{help_text} (env {variable})",
            **kwargs,
        )

    option("--api-url", "TANDEMN_API_URL", None, "control-plane base URL", type=_http_url)
    option("--job-id", "TANDEMN_JOB_ID", None, "job this replica works on")
    option("--replica-id", "TANDEMN_REPLICA_ID", None, "this replica's id")
    option(
        "--engine-url",
        "TANDEMN_ENGINE_URL",
        None,
        "engine base URL, for example http://127.0.0.1:8080",
        type=_http_url,
    )
    option(
        "--served-model",
        "TANDEMN_SERVED_MODEL",
        None,
        "model name put in engine requests; default: the first id from the engine's GET /v1/models",
    )
    option(
        "--concurrency",
        "TANDEMN_CONCURRENCY",
        "8",
        "requests in flight to the engine, shared by all chunks; default 8",
        type=_positive_int,
    )
    option(
        "--engine-ready-timeout",
        "TANDEMN_ENGINE_READY_TIMEOUT",
        "1200",
        "seconds to wait for the engine's GET /health to return 200; default 1200",
        type=_positive_float,
    )
    option(
        "--drain-seconds",
        "TANDEMN_DRAIN_SECONDS",
        "90",
        "seconds that held chunks may run after SIGTERM or SIGINT before their leases are "
        "released; default 90",
        type=_non_negative_float,
    )
    option(
        "--poll-interval",
        "TANDEMN_POLL_INTERVAL",
        "5",
        "seconds between pulls while no chunk is pending but the job is not done; default 5",
        type=_positive_float,
    )
    option(
        "--request-timeout",
        "TANDEMN_REQUEST_TIMEOUT",
        "1800",
        "seconds one engine request may take before it counts as failed; default 1800",
        type=_positive_float,
    )
    option(
        "--max-leases",
        "TANDEMN_MAX_LEASES",
        "2",
        "chunk leases held at once (the chunk finishing plus the next); default 2",
        type=_positive_int,
    )
    option(
        "--metrics-interval",
        "TANDEMN_METRICS_INTERVAL",
        "5",
        "seconds between metric snapshots sent to the control plane; 0 sends none; default 5",
        type=_non_negative_float,
    )
    option(
        "--heartbeat-interval",
        "TANDEMN_HEARTBEAT_INTERVAL",
        "20",
        "seconds between heartbeats; the control plane marks a replica silent for 90 s dead; "
        "0 sends none; default 20",
        type=_non_negative_float,
    )
    option(
        "--spot-notice-url",
        "TANDEMN_SPOT_NOTICE_URL",
        None,
        "instance metadata URL of spot/instance-action, polled every 5 s (404: no notice); a "
        "notice starts a drain; default: not polled",
        type=_http_url,
    )
    option(
        "--metadata-token-url",
        "TANDEMN_METADATA_TOKEN_URL",
        None,
        "IMDSv2 token URL (PUT) whose token the spot notice poller sends; default: none",
        type=_http_url,
    )
    option(
        "--log-level",
        "TANDEMN_LOG_LEVEL",
        "INFO",
        "logging level; default INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )
    return parser


def parse_settings(argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
    parser = build_parser(environ)
    arguments = parser.parse_args(argv)
    required = {
        "--api-url": arguments.api_url,
        "--job-id": arguments.job_id,
        "--replica-id": arguments.replica_id,
        "--engine-url": arguments.engine_url,
    }
    missing = [flag for flag, value in required.items() if not value]
    if missing:
        parser.error(f"missing required options: {', '.join(missing)}")
    token = environ.get(TOKEN_VARIABLE, "").strip()
    parameter = environ.get(TOKEN_PARAMETER_VARIABLE, "").strip()
    if not token and parameter:
        try:
            token = token_from_parameter(parameter, environ.get("TANDEMN_REPLICA_TOKEN_REGION"))
        except (BotoCoreError, ClientError) as error:
            parser.error(f"the replica token could not be read from parameter {parameter}: {error}")
    if not token:
        parser.error(
            f"the replica token is missing: set {TOKEN_VARIABLE}, or {TOKEN_PARAMETER_VARIABLE} "
            "to the SSM parameter that holds it"
        )
    return Settings(
        api_url=arguments.api_url,
        job_id=arguments.job_id,
        replica_id=arguments.replica_id,
        token=token,
        engine_url=arguments.engine_url,
        served_model=arguments.served_model or None,
        concurrency=arguments.concurrency,
        engine_ready_timeout=arguments.engine_ready_timeout,
        drain_seconds=arguments.drain_seconds,
        poll_interval=arguments.poll_interval,
        request_timeout=arguments.request_timeout,
        max_leases=arguments.max_leases,
        log_level=arguments.log_level,
        metrics_interval=arguments.metrics_interval,
        heartbeat_interval=arguments.heartbeat_interval,
        spot_notice_url=arguments.spot_notice_url or None,
        metadata_token_url=arguments.metadata_token_url or None,
    )


async def run_sidecar(settings: Settings) -> int:
    """Build the clients, run the replica and close the clients; return the exit code."""
    control = ControlPlaneClient(
        settings.api_url, settings.job_id, settings.replica_id, settings.token
    )
    engine = EngineClient(
        settings.engine_url,
        concurrency=settings.concurrency,
        request_timeout=settings.request_timeout,
    )
    try:
        storage = ChunkStorage()
        telemetry = (
            Telemetry(control, engine, interval=settings.metrics_interval)
            if settings.metrics_interval > 0
            else None
        )
        runner = Runner(
            control,
            engine,
            storage,
            served_model=settings.served_model,
            concurrency=settings.concurrency,
            max_leases=settings.max_leases,
            poll_interval=settings.poll_interval,
            drain_seconds=settings.drain_seconds,
            engine_ready_timeout=settings.engine_ready_timeout,
            telemetry=telemetry,
        )
        loop = asyncio.get_running_loop()
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(number, runner.request_drain)
        watchers = _start_watchers(settings, control, runner)
        try:
            return await runner.run()
        finally:
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
    finally:
        await control.aclose()
        await engine.aclose()


def _start_watchers(
    settings: Settings, control: ControlPlaneClient, runner: Runner
) -> list[asyncio.Task]:
    """Starts the heartbeat and, when configured, the spot notice poller; both can drain."""

    def drain(reason: str) -> None:
        logger.info("drain requested", extra={"reason": reason})
        runner.request_drain()

    watchers = []
    if settings.heartbeat_interval > 0:
        heartbeat = Heartbeat(control, drain, interval=settings.heartbeat_interval)
        watchers.append(asyncio.create_task(heartbeat.run(), name="heartbeat"))
    if settings.spot_notice_url:
        poller = SpotNoticePoller(
            settings.spot_notice_url, drain, token_url=settings.metadata_token_url
        )
        watchers.append(asyncio.create_task(_run_then_close(poller), name="spot-notice"))
    return watchers


async def _run_then_close(poller: SpotNoticePoller) -> None:
    try:
        await poller.run()
    finally:
        await poller.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(sys.argv[1:] if argv is None else argv, os.environ)
    configure_logging(settings.log_level)
    ids = {"job_id": settings.job_id, "replica_id": settings.replica_id}
    logger.info(
        "sidecar starting",
        extra={**ids, "api_url": settings.api_url, "engine_url": settings.engine_url},
    )
    try:
        code = asyncio.run(run_sidecar(settings))
    except Exception:
        logger.exception("sidecar failed", extra=ids)
        return 1
    logger.info("sidecar stopped", extra={**ids, "exit_code": code})
    return code
