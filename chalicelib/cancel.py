"""Job cancellation (``POST /job/{id}/cancel``): end a job that has not finished, stop its
replicas and keep the chunk outputs already written.

The job moves to ``cancelled`` first, in one conditional write, so from then on a pull hands out
nothing (HTTP 204) and a completion is rejected with 409. Its replicas are then stopped as a kill
stops them: ``killed``, leases back to the queue without spending retries, instance terminated,
launch wait ended. The teardown runs last: it assembles ``output.jsonl`` from the completed chunks
and ``errors.jsonl`` with a ``batch_cancelled`` record for each request that never ran
(``chalicelib/assembly.py``), then writes the run report. Cancelling a cancelled job again stops
any replica left and returns 200, so a retried request is harmless.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from chalicelib import jobs, lifecycle, replicas, teardown
from chalicelib.config import Settings
from chalicelib.errors import Conflict
from chalicelib.states import JOB_ACCEPTS_WORK, JOB_STATUS_RANK, JobStatus, ReplicaPhase

logger = logging.getLogger(__name__)

# A job is cancelled only before assembly: once every chunk has ended there is no work left to
# stop, and the assembler owns the job until it writes the final status.
CANCELLABLE = sorted(JOB_ACCEPTS_WORK | {JobStatus.VALIDATING}, key=JOB_STATUS_RANK.__getitem__)
MAX_REASON_CHARS = 500


def _conflict_for(job_id: str, status: str) -> Conflict:
    if status == JobStatus.ASSEMBLING.value:
        message = (
            f"job {job_id!r} is assembling its output: every chunk has ended, so nothing is left "
            "to cancel; download the output once the job has finished"
        )
    else:
        message = (
            f"job {job_id!r} already ended as {status!r}; only a job that has not ended can be "
            "cancelled"
        )
    return Conflict(message, job_id=job_id, job_status=status)


def cancel_job(settings: Settings, job_id: str, reason: str | None = None) -> dict[str, Any]:
    """Cancels a job, stops its replicas and returns the job's new state.

    Raises NotFound for an unknown job, and Conflict for a job that ended otherwise or is being
    assembled.
    """
    job = jobs.get_job(settings, job_id)
    previous = job["status"]
    reason = (reason or "cancelled by user")[:MAX_REASON_CHARS]
    already = previous == JobStatus.CANCELLED.value
    if not already:
        if previous not in {s.value for s in CANCELLABLE}:
            raise _conflict_for(job_id, previous)
        now = time.time()
        try:
            jobs.transition_job(
                settings,
                job_id,
                JobStatus.CANCELLED,
                extra_set={"cancelled_at": now, "finished_at": now, "cancel_reason": reason},
                sources=CANCELLABLE,
            )
        except Conflict:
            # The job changed between the read and the write: another cancel won, or the job
            # moved to assembling or ended.
            job = jobs.get_job(settings, job_id)
            if job["status"] != JobStatus.CANCELLED.value:
                raise _conflict_for(job_id, job["status"]) from None
            already = True
        else:
            logger.info("job cancelled", extra={"job_id": job_id, "previous_status": previous})

    stopped = []
    for replica in replicas.list_replicas(settings, job_id):
        if lifecycle.stop_replica(
            settings, replica, ReplicaPhase.KILLED, f"job cancelled: {reason}"
        ):
            stopped.append(replica["replica_id"])
            logger.info(
                "replica stopped: job cancelled",
                extra={"job_id": job_id, "replica_id": replica["replica_id"]},
            )
    # The teardown assembles the completed chunks' output, writes the run report and lets each
    # provider clean up after the job. A second start finds the first execution.
    teardown.start_teardown(settings, job_id)

    job = jobs.get_job(settings, job_id)
    progress = jobs.progress_of(job)
    prefix = f"s3://{settings.bucket}/{jobs.output_prefix(settings, job_id)}chunks/"
    return {
        "job_id": job_id,
        "status": job["status"],
        "previous_status": previous,
        "already_cancelled": already,
        "cancel_reason": job.get("cancel_reason"),
        "stopped_replicas": stopped,
        "chunks": progress,
        "chunk_outputs": prefix,
        "message": (
            f"job {job_id} is cancelled; {progress['completed']} of {progress['total']} chunks "
            "had completed, and their records will be in the job's output file once the "
            f"teardown assembles it (`tandemn download {job_id}`)"
        ),
    }
