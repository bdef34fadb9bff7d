"""S3 access: input locations, byte-range reads and a bounded-memory multipart writer."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Iterator
from typing import Any

from botocore.exceptions import ClientError

from chalicelib import aws
from chalicelib.errors import Conflict, InvalidRequest

logger = logging.getLogger(__name__)

# S3 multipart parts must be at least 5 MiB except the last; 8 MiB keeps memory per writer small.
PART_SIZE = 8 * 1024 * 1024
_S3_URI = re.compile(r"^s3://([^/]+)/(.+)$")


def parse_s3_uri(uri: str, field: str = "input_file") -> tuple[str, str]:
    match = _S3_URI.match(uri)
    if not match:
        raise InvalidRequest(f"{field} {uri!r} is not an s3://bucket/key URI", field=field)
    return match.group(1), match.group(2)


def head_object(bucket: str, key: str) -> dict[str, Any] | None:
    try:
        return aws.client("s3").head_object(Bucket=bucket, Key=key)
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code")
        if code in ("404", "NoSuchKey", "NotFound"):
            return None
        if code in ("403", "AccessDenied", "NoSuchBucket"):
            return None
        raise


def object_exists(bucket: str, key: str) -> bool:
    return head_object(bucket, key) is not None


def open_object(bucket: str, key: str, byte_range: tuple[int, int] | None = None) -> Any:
    """Returns the streaming body of an object, or of ``[start, end)`` of it."""
    arguments: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if byte_range is not None:
        start, end = byte_range
        if end <= start:
            return _EmptyBody()
        arguments["Range"] = f"bytes={start}-{end - 1}"
    return aws.client("s3").get_object(**arguments)["Body"]


class _EmptyBody:
    def read(self, size: int = -1) -> bytes:
        return b""

    def iter_lines(self, chunk_size: int = 1024, keepends: bool = False) -> Iterator[bytes]:
        return iter(())


def iter_lines(body: Any) -> Iterator[bytes]:
    """Yields the lines of a streaming body without their line endings; blank lines included."""
    pending = b""
    while True:
        block = body.read(1024 * 1024)
        if not block:
            break
        pending += block
        lines = pending.split(b"\n")
        pending = lines.pop()
        for line in lines:
            yield line.rstrip(b"\r")
    if pending:
        yield pending.rstrip(b"\r")


class MultipartWriter:
    """Writes one S3 object in parts, holding at most one part in memory."""

    def __init__(self, bucket: str, key: str, content_type: str = "application/jsonl") -> None:
        self.bucket = bucket
        self.key = key
        self.content_type = content_type
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self.bytes_written = 0
        self.lines_written = 0

    def write_line(self, line: bytes) -> None:
        self._buffer += line
        self._buffer += b"\n"
        self.bytes_written += len(line) + 1
        self.lines_written += 1
        if len(self._buffer) >= PART_SIZE:
            self._flush_part()

    def _flush_part(self) -> None:
        client = aws.client("s3")
        if self._upload_id is None:
            self._upload_id = client.create_multipart_upload(
                Bucket=self.bucket, Key=self.key, ContentType=self.content_type
            )["UploadId"]
        number = len(self._parts) + 1
        response = client.upload_part(
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=bytes(self._buffer),
        )
        self._parts.append({"PartNumber": number, "ETag": response["ETag"]})
        self._buffer.clear()

    def close(self) -> None:
        client = aws.client("s3")
        if self._upload_id is None:
            client.put_object(
                Bucket=self.bucket,
                Key=self.key,
                Body=bytes(self._buffer),
                ContentType=self.content_type,
            )
            self._buffer.clear()
            return
        if self._buffer:
            self._flush_part()
        client.complete_multipart_upload(
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self._upload_id,
            MultipartUpload={"Parts": self._parts},
        )

    def abort(self) -> None:
        if self._upload_id is None:
            return
        try:
            aws.client("s3").abort_multipart_upload(
                Bucket=self.bucket, Key=self.key, UploadId=self._upload_id
            )
        except ClientError:
            logger.exception("abort of multipart upload failed", extra={"key": self.key})


# Presigned URLs are valid this long: enough to upload 2 GiB at about 2 MB/s.
PRESIGN_SECONDS = 3600


def presigned_upload(settings: Any, filename: str) -> dict[str, Any]:
    """Returns a URL the caller PUTs an input file to, and the s3:// URI to submit."""
    key = f"inputs/{secrets.token_hex(8)}/{filename}"
    url = aws.client("s3").generate_presigned_url(
        "put_object",
        Params={"Bucket": settings.bucket, "Key": key},
        ExpiresIn=PRESIGN_SECONDS,
    )
    return {
        "upload_url": url,
        "method": "PUT",
        "input_file": f"s3://{settings.bucket}/{key}",
        "expires_in": PRESIGN_SECONDS,
    }


def output_links(settings: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Returns download URLs of a finished job's output and error files."""
    if not job.get("output_file"):
        raise Conflict(
            f"job {job['job_id']!r} is {job['status']!r}; its output exists once it has "
            "succeeded, completed with errors, or been cancelled and torn down",
            job_status=job["status"],
        )
    links: dict[str, Any] = {
        "job_id": job["job_id"],
        "status": job["status"],
        "expires_in": PRESIGN_SECONDS,
    }
    for name in ("output_file", "error_file"):
        bucket, key = parse_s3_uri(job[name], name)
        links[name] = job[name]
        links[name.replace("_file", "_url")] = aws.client("s3").generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=PRESIGN_SECONDS
        )
    return links
