"""Hooks that the job, replica and chunk state changes call once each, after their write.

They record the change as an event and keep the metrics consistent with it. A replica that
reaches a terminal phase has its counters folded into the job's retired totals, so the job
snapshot keeps them while leaving out its rates and gauges. A hook never raises for a failed
side effect, because the state change it follows has already happened.
"""

from __future__ import annotations

import logging

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib import events
from chalicelib.config import Settings
from chalicelib.states import REPLICA_TERMINAL, ReplicaPhase

logger = logging.getLogger(__name__)


def job_transitioned(settings: Settings, job_id: str, status: str) -> None:
    events.job_status_changed(settings, job_id, status)


def replica_transitioned(
    settings: Settings,
    job_id: str,
    replica_id: str,
    previous: str,
    phase: str,
    reason: str | None = None,
) -> None:
    events.replica_phase_changed(settings, job_id, replica_id, previous, phase, reason)
    if ReplicaPhase(phase) in REPLICA_TERMINAL:
        from chalicelib import metrics_store  # it imports replicas, which imports this module

        try:
            metrics_store.retire_replica(settings, job_id, replica_id)
        except (ClientError, BotoCoreError):
            # The replica's state item stays, so its counters still count and its rates leave
            # the job snapshot once they are STALE_AFTER_SECONDS old.
            logger.exception(
                "retiring replica metrics failed",
                extra={"job_id": job_id, "replica_id": replica_id},
            )


def chunk_taken_back(
    settings: Settings,
    job_id: str,
    chunk_id: str,
    replica_id: str | None,
    reason: str,
    status: str,
) -> None:
    events.chunk_taken_back(settings, job_id, chunk_id, replica_id, reason, status)
