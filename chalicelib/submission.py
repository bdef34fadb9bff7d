"""Job submission: check the input object, validate it in one streaming pass, create the job and
its chunks. Nothing is written for an input that fails validation, so a bad file leaves no job.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

from chalicelib import background, chunks, jobs, placement, providers, replicas, storage, validation
from chalicelib.config import Settings, load_settings
from chalicelib.errors import InvalidInput, InvalidRequest
from chalicelib.models import SubmitBatchRequest
from chalicelib.states import JobStatus

logger = logging.getLogger(__name__)


def _stats_view(stats: validation.InputStats) -> dict[str, Any]:
    return {
        "num_lines": stats.num_requests,
        "avg_input_tokens": round(stats.avg_input_tokens, 1),
        "max_input_tokens": stats.max_input_tokens,
        "total_input_tokens": stats.total_input_tokens,
        "max_requested_output_tokens": stats.max_requested_output_tokens,
        "url": stats.url,
        "total_bytes": stats.total_bytes,
    }


def _errors_view(result: validation.ValidationResult) -> list[dict[str, Any]]:
    return [asdict(error) for error in result.errors]


def _invalid_input(result: validation.ValidationResult, input_file: str) -> InvalidInput:
    first = result.errors[0].message
    more = len(result.errors) - 1
    summary = f"input file {input_file} is invalid: {first}"
    if more:
        summary += f" (and {more} more error{'s' if more > 1 else ''} listed in 'errors')"
    if result.truncated:
        summary += f"; validation stopped after {validation.MAX_REPORTED_ERRORS} errors"
    return InvalidInput(summary, errors=_errors_view(result), truncated=result.truncated)


def submit(settings: Settings, request: SubmitBatchRequest) -> dict[str, Any]:
    if settings.served_models and request.model_name not in settings.served_models:
        served = ", ".join(settings.served_models)
        raise InvalidRequest(
            f"model_name {request.model_name!r} is not served here: this deployment's engines "
            f"serve only {served}; submit the job with one of those names",
            field="model_name",
        )
    bucket, key = storage.parse_s3_uri(request.input_file)
    head = storage.head_object(bucket, key)
    if head is None:
        raise InvalidRequest(
            f"input_file {request.input_file} was not found or is not readable; upload it first "
            "(`tandemn deploy` uploads a local file for you)",
            field="input_file",
        )
    size = int(head["ContentLength"])
    if size == 0:
        message = f"input file {request.input_file} is empty; it must contain at least one request"
        raise InvalidInput(message, errors=[{"line": None, "field": None, "message": message}])
    if size > validation.MAX_FILE_BYTES:
        raise InvalidInput(
            f"input file {request.input_file} is {size} bytes, more than the limit of "
            f"{validation.MAX_FILE_BYTES} bytes (2 GiB); split it into several jobs",
            errors=[],
        )
    job_id = jobs.new_job_id(request.model_name)
    fields = {
        "model_name": request.model_name,
        "input_file": request.input_file,
        "input_bucket": bucket,
        "input_key": key,
        "input_etag": head.get("ETag"),
        "input_size": size,
        "description": request.description,
        "user_id": request.user_id,
        "requested": request.model_dump(
            exclude={"model_name", "input_file", "description", "user_id"}
        ),
    }
    fields = {k: v for k, v in fields.items() if v is not None}
    if size > settings.sync_validation_max_bytes:
        jobs.put_new_job(settings, jobs.base_job_item(job_id, JobStatus.VALIDATING, fields))
        background.submit("validate", {"job_id": job_id})
        return {
            "status": JobStatus.VALIDATING.value,
            "job_id": job_id,
            "chunks": 0,
            "input_stats": {"total_bytes": size},
            "output_location": f"s3://{settings.bucket}/{jobs.output_prefix(settings, job_id)}",
            "message": f"input is {size} bytes; it is validated in the background, watch "
            f"GET /job/{job_id} for the result",
        }
    result = _validate(bucket, key, size, request.chunk_size)
    if not result.ok:
        raise _invalid_input(result, request.input_file)
    # Planned before anything is written: an infeasible user_specified placement is a 409.
    fields.update(placement.plan_for_job(settings, request, result.stats))
    _create_chunks_and_job(settings, job_id, fields, result)
    launched, warning = _launch_initial_replicas(
        settings, job_id, request.model_dump(), len(result.chunks)
    )
    response = {
        "status": JobStatus.QUEUED.value,
        "job_id": job_id,
        "chunks": len(result.chunks),
        "replicas": launched,
        "input_stats": _stats_view(result.stats),
        **placement.response_fields(fields),
        "output_location": f"s3://{settings.bucket}/{jobs.output_prefix(settings, job_id)}",
        "message": f"job created with {len(result.chunks)} chunks; it waits for replicas",
    }
    if warning:
        response["replica_warning"] = warning
    return response


def _validate(bucket: str, key: str, size: int, chunk_size: int) -> validation.ValidationResult:
    started = time.monotonic()
    body = storage.open_object(bucket, key)
    result = validation.validate_and_split(body, chunk_size, total_bytes=size)
    logger.info(
        "input validated",
        extra={
            "key": key,
            "bytes": size,
            "requests": result.stats.num_requests,
            "errors": len(result.errors),
            "seconds": round(time.monotonic() - started, 3),
        },
    )
    return result


def _counter_fields(result: validation.ValidationResult) -> dict[str, Any]:
    return {
        "total_chunks": len(result.chunks),
        "pending": len(result.chunks),
        "num_requests": result.stats.num_requests,
        "input_stats": _stats_view(result.stats),
    }


def _create_chunks_and_job(
    settings: Settings, job_id: str, fields: dict[str, Any], result: validation.ValidationResult
) -> None:
    # Chunks first, then the job item: a crash in between leaves orphan chunk items that no job
    # refers to, never a job whose counters promise chunks that do not exist.
    chunks.write_chunks(settings, job_id, result.chunks)
    item = jobs.base_job_item(job_id, JobStatus.QUEUED, {**fields, **_counter_fields(result)})
    jobs.put_new_job(settings, item)
    logger.info("job created", extra={"job_id": job_id, "chunks": len(result.chunks)})


def _launch_initial_replicas(
    settings: Settings, job_id: str, requested: dict[str, Any], num_chunks: int
) -> tuple[list[str], str | None]:
    """Starts the job's first replicas through the stage's provider.

    Returns their ids and a warning when fewer started than requested. Each replica needs a
    chunk of its own to work on, so replicas beyond the number of chunks would be paid for and
    stay idle, and at most ``num_chunks`` start. With the ``external`` provider nothing starts: the user
    adds replicas with ``POST /job/{id}/scale`` and runs them with the tokens it returns.
    """
    provider = providers.default_name()
    if provider == "external":
        return [], None
    requested_count = requested.get("replicas") or 1
    count = min(requested_count, num_chunks) if num_chunks > 0 else requested_count
    warning = None
    if count < requested_count:
        warning = (
            f"{count} of the {requested_count} requested replicas started, because the job has "
            f"{num_chunks} chunk{'s' if num_chunks != 1 else ''} and each replica needs a chunk "
            "of its own; use a smaller chunk_size to spread the work over more replicas"
        )
        logger.warning(
            "fewer replicas started than requested",
            extra={
                "job_id": job_id,
                "requested": requested_count,
                "started": count,
                "chunks": num_chunks,
            },
        )
    config = {key: requested.get(key) for key in ("gpu_type", "tp_size", "pp_size")}
    registered = replicas.register_replicas(
        settings, job_id, count, provider=provider, config=config
    )
    return [entry["replica_id"] for entry in registered["replicas"]], warning


def validate_in_background(settings: Settings, job_id: str) -> None:
    job = jobs.get_job(settings, job_id)
    if job["status"] != JobStatus.VALIDATING.value:
        return
    requested = job.get("requested") or {}
    result = _validate(
        job["input_bucket"],
        job["input_key"],
        int(job["input_size"]),
        int(requested.get("chunk_size", 1000)),
    )
    if not result.ok:
        error = _invalid_input(result, job["input_file"])
        jobs.transition_job(
            settings,
            job_id,
            JobStatus.FAILED,
            extra_set={"validation_errors": _errors_view(result), "failure_reason": error.message},
        )
        return
    try:
        planned = placement.plan_for_job(settings, placement.stored_request(job), result.stats)
    except placement.PLAN_ERRORS as error:
        jobs.transition_job(
            settings, job_id, JobStatus.FAILED, extra_set={"failure_reason": error.message}
        )
        return
    chunks.write_chunks(settings, job_id, result.chunks)
    jobs.transition_job(
        settings, job_id, JobStatus.QUEUED, extra_set={**_counter_fields(result), **planned}
    )
    _launch_initial_replicas(settings, job_id, requested, len(result.chunks))


@background.task("validate")
def validate_task(payload: dict[str, Any]) -> None:
    validate_in_background(load_settings(), payload["job_id"])
