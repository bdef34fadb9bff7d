"""Teardown of a job whose chunks have all ended, or that failed: assemble the output, terminate
every instance unless the job asked to ``persist``, then write the run report.

The teardown state machine (``<job>-teardown``) runs the three tasks in order. The report comes
last so that it records each replica's final phase and the cost up to its stop. Where no teardown
state machine is configured (tests that use the ``external`` provider only) the same tasks run
through ``chalicelib/background.py``.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from chalicelib import assembly, background, executions, jobs, lifecycle, providers, replicas
from chalicelib.config import Settings, load_settings
from chalicelib.errors import NotFound
from chalicelib.states import JOB_TERMINAL, JobStatus, ReplicaPhase

logger = logging.getLogger(__name__)

# (module, function) of the run report writer, called with (settings, job_id) when it exists;
# without it the step does nothing. Assembly writes the report of a finished job too, and the
# writer overwrites the same report, so this step adds the report of a job that failed.
RUN_REPORT_WRITERS = (("chalicelib.analytics", "write_run_report"),)


class AssemblyInProgress(Exception):
    """Another assembler has claimed the job, so the teardown state machine retries the step."""


def teardown_execution_name(job_id: str) -> str:
    return executions.execution_name(job_id, "teardown")


def start_teardown(settings: Settings, job_id: str) -> None:
    """Starts the job's teardown once; a second call while it runs or after it does nothing.

    When an earlier teardown execution ended without finishing the job (it failed or was
    stopped), the tasks run again through the background runner.
    """
    if executions.machine_arn("teardown") is None:
        background.submit("teardown", {"job_id": job_id})
        return
    name = teardown_execution_name(job_id)
    _, started = executions.start("teardown", name, {"job_id": job_id})
    if started:
        return
    if executions.status("teardown", name) == "RUNNING":
        return
    job = jobs.get_job(settings, job_id)
    if job["status"] not in {s.value for s in JOB_TERMINAL}:
        logger.warning(
            "teardown execution ended without finishing the job, running it again",
            extra={"job_id": job_id, "status": job["status"]},
        )
        background.submit("teardown", {"job_id": job_id})


@lifecycle.task("assemble")
def assemble_step(settings: Settings, event: dict[str, Any]) -> dict[str, Any]:
    job_id = event["job_id"]
    result = assembly.assemble(settings, job_id)
    if result is not None:
        return {"status": result["status"]}
    job = jobs.get_job(settings, job_id)
    if job["status"] == JobStatus.ASSEMBLING.value:
        raise AssemblyInProgress(f"job {job_id} is being assembled by another assembler")
    if job["status"] == JobStatus.CANCELLED.value:
        try:
            assembly.assemble_cancelled(settings, job_id)
        except Exception:
            # The instances must still be terminated, so a failed partial output is only logged. The
            # completed chunks' records stay at their per-attempt keys.
            logger.exception("cancelled job's partial output failed", extra={"job_id": job_id})
    return {"status": job["status"]}


def _run_report_writer() -> Any:
    for module_name, function_name in RUN_REPORT_WRITERS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        writer = getattr(module, function_name, None)
        if callable(writer):
            return writer
    return None


@lifecycle.task("write_report")
def write_report_step(settings: Settings, event: dict[str, Any]) -> dict[str, Any]:
    writer = _run_report_writer()
    if writer is None:
        return {"written": False, "reason": "no run report writer in this deployment"}
    writer(settings, event["job_id"])
    return {"written": True}


@lifecycle.task("terminate_all")
def terminate_all_step(settings: Settings, event: dict[str, Any]) -> dict[str, Any]:
    """Stops every replica of the job and its machines, unless the job asked to persist."""
    job_id = event["job_id"]
    job = jobs.get_job(settings, job_id)
    if job["status"] not in {s.value for s in JOB_TERMINAL}:
        # Only a finished job loses its replicas, so a teardown started too early changes nothing.
        logger.warning(
            "teardown skipped: job has not ended", extra={"job_id": job_id, "status": job["status"]}
        )
        return {"persisted": False, "terminated": [], "skipped": f"job is {job['status']}"}
    if (job.get("requested") or {}).get("persist"):
        logger.info("job persists, its instances keep running", extra={"job_id": job_id})
        return {"persisted": True, "terminated": []}
    terminated = []
    used_providers: set[str] = set()
    for replica in replicas.list_replicas(settings, job_id):
        name = replica.get("provider", "external")
        used_providers.add(name)
        provider = providers.get(name)
        if not replicas.is_terminal(replica["phase"]):
            lifecycle.stop_replica(
                settings, replica, ReplicaPhase.COMPLETED, f"job is {job['status']}"
            )
        elif provider is not None:
            provider.terminate(job_id, replica["replica_id"])
        terminated.append(replica["replica_id"])
    for name in used_providers:
        cleanup = getattr(providers.get(name), "cleanup_job", None)
        if callable(cleanup):
            cleanup(job_id)
    logger.info("job instances terminated", extra={"job_id": job_id, "replicas": terminated})
    return {"persisted": False, "terminated": terminated}


@background.task("teardown")
def teardown_in_background(payload: dict[str, Any]) -> None:
    settings = load_settings()
    event = {"job_id": payload["job_id"]}
    try:
        assemble_step(settings, event)
    except AssemblyInProgress:
        logger.info("assembly already running elsewhere", extra=event)
        return
    except NotFound:
        return
    terminate_all_step(settings, event)
    try:
        write_report_step(settings, event)
    except Exception:
        logger.exception("run report failed", extra=event)
