"""Control-plane metrics in CloudWatch embedded metric format (Powertools Metrics).

Handlers add counts during a request. At the end of each Lambda invocation a Chalice middleware
in app.py calls ``flush``, which prints them as one EMF JSON line, and CloudWatch Logs turns the
line into metrics. The namespace is always set, so serialising never raises for want of one.
``POWERTOOLS_METRICS_DISABLED=true`` (the local and test stages) drops the counts instead.
"""

from __future__ import annotations

import logging
import os

from aws_lambda_powertools import Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.metrics.functions import is_metrics_disabled

logger = logging.getLogger(__name__)

NAMESPACE = os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "Tandemn")
metrics = Metrics(
    namespace=NAMESPACE,
    service=os.environ.get("POWERTOOLS_SERVICE_NAME", "tandemn-control-plane"),
)

JOBS_SUBMITTED = "JobsSubmitted"
CHUNKS_COMPLETED = "ChunksCompleted"
CHUNK_RECLAIMS = "ChunkReclaims"
LAUNCH_FAILURES = "LaunchFailures"
SNAPSHOTS_INGESTED = "MetricSnapshotsIngested"


def count(name: str, value: float = 1) -> None:
    """Adds ``value`` to the count named ``name`` for this invocation."""
    metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)


def flush() -> None:
    """Writes the counts added since the last flush; does nothing when none were added."""
    if not metrics.metric_set:
        return
    if is_metrics_disabled():
        metrics.clear_metrics()
        return
    try:
        metrics.flush_metrics()
    except Exception:
        # A metric must never fail the request that produced it.
        logger.exception("flushing control-plane metrics failed")
        metrics.clear_metrics()
