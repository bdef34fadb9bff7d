"""Deadline projection: will a job finish before its ``slo_deadline_hours`` at its current pace?

The pace is chunks completed per second since the job was created, so it includes the time the
first replicas took to start and errs towards "late" early in a job. A job is at risk when its
remaining chunks at that pace end after the deadline. With no chunk completed yet there is no
pace, and a job is at risk only once its deadline has passed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Projection:
    deadline_at: float
    remaining_chunks: int
    # Chunks per second; None before the first chunk completes.
    pace: float | None
    projected_finish_at: float | None
    at_risk: bool


def deadline_at(job: dict[str, Any]) -> float:
    hours = float((job.get("requested") or {}).get("slo_deadline_hours") or 4.0)
    return float(job.get("created_at") or time.time()) + hours * 3600


def project(
    job: dict[str, Any],
    now: float | None = None,
    *,
    capacity_factor: float = 1.0,
) -> Projection:
    """Projects the finish time. ``capacity_factor`` scales the pace (0.5: half the replicas)."""
    now = time.time() if now is None else now
    deadline = deadline_at(job)
    remaining = int(job.get("pending", 0)) + int(job.get("inflight", 0))
    completed = int(job.get("completed", 0))
    elapsed = max(now - float(job.get("created_at") or now), 1.0)
    if remaining == 0:
        return Projection(deadline, 0, completed / elapsed if completed else None, now, False)
    if completed == 0 or capacity_factor <= 0:
        return Projection(deadline, remaining, None, None, now > deadline or capacity_factor <= 0)
    pace = completed / elapsed * capacity_factor
    finish = now + remaining / pace
    return Projection(deadline, remaining, pace, finish, finish > deadline)


def needs_replacement(job: dict[str, Any], live_before: int, live_after: int) -> bool:
    """Decides whether a lost replica must be replaced for the job to meet its deadline.

    ``live_before`` and ``live_after`` count the job's working replicas before and after the
    loss. No replica left with work remaining always needs one.
    """
    remaining = int(job.get("pending", 0)) + int(job.get("inflight", 0))
    if remaining == 0:
        return False
    if live_after <= 0:
        return True
    factor = live_after / max(live_before, 1)
    projection = project(job, capacity_factor=factor)
    if projection.pace is None:
        # No pace measured yet: replace, since waiting to learn the pace costs deadline time.
        return True
    return projection.at_risk
