"""Output assembly: when every chunk has ended, stream the winning attempt of each chunk, in input
order, into ``output.jsonl`` and ``errors.jsonl`` (OpenAI batch output format).

Assembly re-reads each chunk's input range, so every input ``custom_id`` appears exactly once
across the two files whatever an attempt wrote: a record for an id the chunk does not hold, or a
second record for the same id, is dropped; an id with no record becomes an error record. Memory is
bounded by one chunk's ids plus one multipart part per file.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from botocore.exceptions import ClientError

from chalicelib import analytics, aws, background, dynamo, jobs, storage
from chalicelib.config import Settings, load_settings
from chalicelib.errors import NotFound
from chalicelib.states import JOB_ACCEPTS_WORK, JOB_TERMINAL, ChunkStatus, JobStatus

logger = logging.getLogger(__name__)

# An assembler holds the job this long; past it (a crashed Lambda) another one may take over.
ASSEMBLY_LEASE_SECONDS = 900


def error_record(custom_id: str, code: str, message: str) -> bytes:
    record = {
        "id": f"batch_req_{custom_id}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }
    return json.dumps(record, ensure_ascii=False).encode()


def _claim(settings: Settings, job: dict[str, Any]) -> bool:
    """Moves the job to ``assembling`` (or takes over a stale assembly); True if this caller won.

    Condition expressions have no arithmetic, so "every chunk has ended" is checked on the
    counters just read and the write requires them unchanged.
    """
    job_id = job["job_id"]
    progress = jobs.progress_of(job)
    if not progress["all_done"] and job["status"] != JobStatus.ASSEMBLING.value:
        return False
    now = time.time()
    values: dict[str, Any] = {
        ":assembling": JobStatus.ASSEMBLING.value,
        ":now": now,
        ":until": now + ASSEMBLY_LEASE_SECONDS,
    }
    accepting = []
    for i, status in enumerate(sorted(JOB_ACCEPTS_WORK)):
        values[f":ok{i}"] = status.value
        accepting.append(f":ok{i}")
    condition = (
        f"(#status IN ({', '.join(accepting)}) AND completed = :completed AND failed = :failed) "
        "OR (#status = :assembling AND assembly_lease_until < :now)"
    )
    values[":completed"] = progress["completed"]
    values[":failed"] = progress["failed"]
    try:
        aws.client("dynamodb").update_item(
            TableName=settings.jobs_table,
            Key={"job_id": {"S": job_id}},
            UpdateExpression="SET #status = :assembling, assembly_lease_until = :until, "
            "updated_at = :now",
            ConditionExpression=condition,
            ExpressionAttributeNames={"#status": "status"},
            ExpressionAttributeValues=dynamo.serialize(values),
        )
    except ClientError as error:
        if dynamo.is_condition_failure(error):
            return False
        raise
    return True


def _release_claim(settings: Settings, job_id: str) -> None:
    """Ends a failed assembly's lease, so the watchdog's next pass starts it again at once."""
    try:
        aws.client("dynamodb").update_item(
            TableName=settings.jobs_table,
            Key={"job_id": {"S": job_id}},
            UpdateExpression="SET assembly_lease_until = :zero",
            ConditionExpression="#status = :assembling",
            ExpressionAttributeNames={"#status": "status"},
            ExpressionAttributeValues=dynamo.serialize(
                {":zero": 0, ":assembling": JobStatus.ASSEMBLING.value}
            ),
        )
    except ClientError as error:
        # The lease then runs out after ASSEMBLY_LEASE_SECONDS instead.
        logger.warning(
            "failed to release the assembly lease", extra={"job_id": job_id, "error": str(error)}
        )
        return
    logger.warning("assembly failed, lease released for a retry", extra={"job_id": job_id})


def _iter_chunks(settings: Settings, job_id: str):
    client = aws.client("dynamodb")
    query: dict[str, Any] = {
        "TableName": settings.chunks_table,
        "KeyConditionExpression": "job_id = :job",
        "ExpressionAttributeValues": {":job": {"S": job_id}},
        "ConsistentRead": True,
    }
    while True:
        page = client.query(**query)
        for item in page.get("Items", []):
            yield dynamo.deserialize(item)
        if not page.get("LastEvaluatedKey"):
            return
        query["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def _input_custom_ids(job: dict[str, Any], chunk: dict[str, Any]) -> list[str]:
    body = storage.open_object(
        job["input_bucket"], job["input_key"], (int(chunk["byte_start"]), int(chunk["byte_end"]))
    )
    ids = []
    for line in storage.iter_lines(body):
        if line.strip():
            ids.append(json.loads(line)["custom_id"])
    return ids


class _Counts:
    def __init__(self) -> None:
        self.succeeded = 0
        self.failed = 0
        self.dropped = 0
        # Token usage of the successful records written to output.jsonl.
        self.prompt_tokens = 0
        self.generation_tokens = 0

    def add_usage(self, record: dict[str, Any]) -> None:
        # A replica's record is untrusted JSON, so every level is checked before it is read.
        response = record.get("response")
        body = response.get("body") if isinstance(response, dict) else None
        usage = body.get("usage") if isinstance(body, dict) else None
        if not isinstance(usage, dict):
            return
        self.prompt_tokens += _token_count(usage.get("prompt_tokens"))
        self.generation_tokens += _token_count(usage.get("completion_tokens"))


def _token_count(value: Any) -> int:
    """Returns a usage count, or 0 for one no engine produces (negative, fractional, a string)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return 0


def _copy_completed_chunk(
    settings: Settings,
    job: dict[str, Any],
    chunk: dict[str, Any],
    output: storage.MultipartWriter,
    errors: storage.MultipartWriter,
    counts: _Counts,
) -> None:
    expected = _input_custom_ids(job, chunk)
    remaining = set(expected)
    body = storage.open_object(settings.bucket, chunk["output_key"])
    for line in storage.iter_lines(body):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            custom_id = record["custom_id"]
        except (ValueError, KeyError, TypeError):
            counts.dropped += 1
            continue
        if custom_id not in remaining:
            counts.dropped += 1
            continue
        remaining.discard(custom_id)
        if record.get("error"):
            errors.write_line(line)
            counts.failed += 1
        else:
            output.write_line(line)
            counts.succeeded += 1
            counts.add_usage(record)
    for custom_id in expected:
        if custom_id in remaining:
            errors.write_line(
                error_record(
                    custom_id,
                    "missing_output",
                    f"the replica's output for chunk {chunk['chunk_id']} had no record for this request",
                )
            )
            counts.failed += 1
    if counts.dropped:
        logger.warning(
            "dropped records that do not belong to the chunk",
            extra={
                "job_id": job["job_id"],
                "chunk_id": chunk["chunk_id"],
                "dropped": counts.dropped,
            },
        )


def _write_failed_chunk(
    job: dict[str, Any], chunk: dict[str, Any], errors: storage.MultipartWriter, counts: _Counts
) -> None:
    reason = chunk.get("last_error") or "no attempt finished"
    message = (
        f"chunk {chunk['chunk_id']} failed after {chunk.get('failures', 0)} attempts: {reason}"
    )
    for custom_id in _input_custom_ids(job, chunk):
        errors.write_line(error_record(custom_id, "chunk_failed", message))
        counts.failed += 1


def assemble(settings: Settings, job_id: str) -> dict[str, Any] | None:
    """Assembles a finished job's output; returns the final job fields, None if not ready."""
    try:
        job = jobs.get_job(settings, job_id)
    except NotFound:
        return None
    if job["status"] in {s.value for s in JOB_TERMINAL}:
        return None
    if not _claim(settings, job):
        return None
    try:
        fields = _write_files(settings, job)
    except Exception:
        _release_claim(settings, job_id)
        raise
    final = JobStatus.COMPLETED_WITH_ERRORS if fields["requests_failed"] else JobStatus.SUCCEEDED
    fields["finished_at"] = time.time()
    jobs.transition_job(settings, job_id, final, extra_set=fields)
    analytics.write_run_report_safely(settings, job_id)
    logger.info(
        "job output assembled",
        extra={
            "job_id": job_id,
            "status": final.value,
            "succeeded": fields["requests_succeeded"],
            "failed": fields["requests_failed"],
        },
    )
    return {"status": final.value, **fields}


def assemble_cancelled(settings: Settings, job_id: str) -> dict[str, Any] | None:
    """Assembles what a cancelled job completed; returns the fields written, None if none were.

    Every input ``custom_id`` still appears once: the completed chunks' records, the failed
    chunks' error records, and a ``batch_cancelled`` error record for each request that never
    ran. A cancelled job accepts no completion, so two assemblers write the same successful
    records. The job keeps its ``cancelled`` status.
    """
    job = jobs.get_job(settings, job_id)
    if job["status"] != JobStatus.CANCELLED.value or job.get("output_file"):
        return None
    if not int(job.get("total_chunks", 0)):
        # Cancelled while its input was validated: no chunk, so no request to account for.
        return None
    fields = _write_files(settings, job, cancelled=True)
    try:
        aws.client("dynamodb").update_item(
            TableName=settings.jobs_table,
            Key={"job_id": {"S": job_id}},
            UpdateExpression="SET " + ", ".join(f"{name} = :{name}" for name in fields),
            ConditionExpression="#status = :cancelled",
            ExpressionAttributeNames={"#status": "status"},
            ExpressionAttributeValues=dynamo.serialize(
                {":cancelled": JobStatus.CANCELLED.value}
                | {f":{name}": value for name, value in fields.items()}
            ),
        )
    except ClientError as error:
        if not dynamo.is_condition_failure(error):
            raise
        logger.warning("cancelled job changed status during assembly", extra={"job_id": job_id})
        return None
    logger.info(
        "cancelled job's partial output assembled",
        extra={
            "job_id": job_id,
            "succeeded": fields["requests_succeeded"],
            "failed": fields["requests_failed"],
            "cancelled": fields["requests_cancelled"],
        },
    )
    return fields


def _write_files(
    settings: Settings, job: dict[str, Any], *, cancelled: bool = False
) -> dict[str, Any]:
    """Streams every chunk's records into ``output.jsonl`` and ``errors.jsonl``.

    Returns the job fields that name the files and count the requests. A pending or in-flight
    chunk is an error unless the job was ``cancelled``, where its requests get error records.
    """
    job_id = job["job_id"]
    prefix = jobs.output_prefix(settings, job_id)
    output = storage.MultipartWriter(settings.bucket, prefix + "output.jsonl")
    errors = storage.MultipartWriter(settings.bucket, prefix + "errors.jsonl")
    counts = _Counts()
    failed_chunks = 0
    not_run = 0
    try:
        for chunk in _iter_chunks(settings, job_id):
            if chunk["status"] == ChunkStatus.COMPLETED.value:
                _copy_completed_chunk(settings, job, chunk, output, errors, counts)
            elif chunk["status"] == ChunkStatus.FAILED.value:
                failed_chunks += 1
                _write_failed_chunk(job, chunk, errors, counts)
            elif cancelled:
                not_run += _write_cancelled_chunk(job, chunk, errors)
            else:
                raise RuntimeError(
                    f"chunk {chunk['chunk_id']} is {chunk['status']} during assembly"
                )
        output.close()
        errors.close()
    except Exception:
        output.abort()
        errors.abort()
        raise
    fields = {
        "output_file": f"s3://{settings.bucket}/{prefix}output.jsonl",
        "error_file": f"s3://{settings.bucket}/{prefix}errors.jsonl",
        "requests_succeeded": counts.succeeded,
        "requests_failed": counts.failed,
        "chunks_failed": failed_chunks,
        "output_prompt_tokens": counts.prompt_tokens,
        "output_generation_tokens": counts.generation_tokens,
    }
    if cancelled:
        fields["requests_cancelled"] = not_run
    return fields


def _write_cancelled_chunk(
    job: dict[str, Any], chunk: dict[str, Any], errors: storage.MultipartWriter
) -> int:
    message = f"job {job['job_id']} was cancelled before chunk {chunk['chunk_id']} completed"
    count = 0
    for custom_id in _input_custom_ids(job, chunk):
        errors.write_line(error_record(custom_id, "batch_cancelled", message))
        count += 1
    return count


@background.task("assemble")
def assemble_task(payload: dict[str, Any]) -> None:
    assemble(load_settings(), payload["job_id"])
