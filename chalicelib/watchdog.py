"""The watchdog: runs every minute (EventBridge schedule; a timer in the local stack).

It reads only items that can need work: active jobs from the sparse ``active_jobs`` index and, per
job, expired leases from the sparse ``leases_by_expiry`` index and the job's replicas (a Query on
its partition key). It marks replicas without a recent heartbeat dead and returns their chunks
(``chalicelib/liveness.py``), and it reclaims expired leases. It flags jobs that will miss their
deadline. It starts the teardown (assembly, then termination) of jobs whose chunks have all
ended, and picks up an assembly whose trigger was lost or whose assembler crashed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from chalicelib import background, chunks, jobs, liveness, teardown
from chalicelib.config import Settings
from chalicelib.errors import NotFound
from chalicelib.states import JOB_ACCEPTS_WORK, JobStatus

logger = logging.getLogger(__name__)

# Validation of a 2 GiB file takes under a minute at the measured 39 MB/s; a job still
# validating after this long lost its validator.
STALE_VALIDATION_SECONDS = 15 * 60


def run_once(settings: Settings) -> dict[str, Any]:
    reclaimed = 0
    assembling: list[str] = []
    dead: list[str] = []
    at_risk: list[str] = []
    for job_id in jobs.list_active_job_ids(settings):
        try:
            job = jobs.get_job(settings, job_id)
        except NotFound:
            continue
        status = JobStatus(job["status"])
        if status == JobStatus.VALIDATING:
            # A background validation that died (a Lambda timeout, a crash) is started again;
            # it rewrites the same chunk items, so a second run is harmless.
            if _now() - float(job.get("updated_at", 0)) > STALE_VALIDATION_SECONDS:
                jobs.touch(settings, job_id)
                background.submit("validate", {"job_id": job_id})
            continue
        if status in JOB_ACCEPTS_WORK:
            replica_changes = liveness.check_replicas(settings, job, _now())
            dead.extend(replica_changes["dead"])
            if replica_changes["dead"]:
                job = jobs.get_job(settings, job_id)
        if status in JOB_ACCEPTS_WORK and chunks.recover_unreachable(settings, job, _now()):
            job = jobs.get_job(settings, job_id)
        if status in JOB_ACCEPTS_WORK and int(job.get("inflight", 0)) > 0:
            count = chunks.reclaim_expired(settings, job_id)
            if count:
                reclaimed += count
                job = jobs.get_job(settings, job_id)
        progress = jobs.progress_of(job)
        accepting = status in JOB_ACCEPTS_WORK
        if (
            accepting
            and not progress["all_done"]
            and liveness.check_deadline(settings, job, _now())
        ):
            at_risk.append(job_id)
        if progress["all_done"] and status in JOB_ACCEPTS_WORK:
            # Teardown assembles the output, then terminates the job's instances.
            teardown.start_teardown(settings, job_id)
            assembling.append(job_id)
        elif progress["all_done"] and status == JobStatus.ASSEMBLING:
            if float(job.get("assembly_lease_until", 0)) > _now():
                continue
            background.submit("assemble", {"job_id": job_id})
            assembling.append(job_id)
    summary = {
        "reclaimed": reclaimed,
        "assembling": assembling,
        "dead_replicas": dead,
        "deadline_at_risk": at_risk,
    }
    # A pass that changed nothing is logged at DEBUG: the local stack runs one every few seconds.
    log = logger.info if reclaimed or assembling or dead or at_risk else logger.debug
    log("watchdog pass finished", extra=summary)
    return summary


def _now() -> float:

    return time.time()
