"""Chunk input reads and output writes on S3, run in worker threads with ``asyncio.to_thread``.

The boto3 client resolves its endpoint, region and credentials through boto3's standard
configuration (environment, config files, instance role); this module sets none of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    ParamValidationError,
)

from sidecar.retry import RetryPolicy

logger = logging.getLogger(__name__)

# S3 error codes that can succeed when tried again. Other 4xx responses are final.
_TRANSIENT_CODES = frozenset(
    {"RequestTimeout", "SlowDown", "Throttling", "ThrottlingException", "RequestTimeTooSkewed"}
)


class StorageError(Exception):
    """An S3 read or write that failed for good (after retries, or with a final 4xx)."""


def default_s3_client() -> Any:
    # botocore's own retries are off so that every retry goes through ChunkStorage and is logged.
    return boto3.session.Session().client(
        "s3", config=Config(retries={"total_max_attempts": 1, "mode": "standard"})
    )


class ChunkStorage:
    def __init__(self, client: Any = None, retry: RetryPolicy | None = None) -> None:
        self._client = client if client is not None else default_s3_client()
        self.retry = retry or RetryPolicy(max_attempts=4, max_elapsed=60.0)

    async def read_range(
        self,
        bucket: str,
        key: str,
        byte_start: int,
        byte_end: int,
        etag: str | None,
        log_ids: dict[str, Any],
    ) -> bytes:
        """Return bytes ``[byte_start, byte_end)`` of the object; with ``etag``, only of that version."""
        if byte_end <= byte_start:
            return b""
        arguments: dict[str, Any] = {
            "Bucket": bucket,
            "Key": key,
            "Range": f"bytes={byte_start}-{byte_end - 1}",
        }
        if etag:
            arguments["IfMatch"] = etag

        def read() -> bytes:
            response = self._client.get_object(**arguments)
            return response["Body"].read()

        data = await self._with_retries(f"read s3://{bucket}/{key}", read, log_ids)
        if len(data) != byte_end - byte_start:
            raise StorageError(
                f"read s3://{bucket}/{key} bytes {byte_start}-{byte_end - 1} returned "
                f"{len(data)} bytes, expected {byte_end - byte_start}"
            )
        return data

    async def write(self, bucket: str, key: str, data: bytes, log_ids: dict[str, Any]) -> None:
        def put() -> None:
            self._client.put_object(
                Bucket=bucket, Key=key, Body=data, ContentType="application/jsonl"
            )

        await self._with_retries(f"write s3://{bucket}/{key}", put, log_ids)

    async def _with_retries(self, action: str, call: Any, log_ids: dict[str, Any]) -> Any:
        started = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            try:
                return await asyncio.to_thread(call)
            except (ClientError, BotoCoreError) as error:
                failure = _describe(error)
                transient = _is_transient(error)
            delay = self.retry.delay(attempts)
            if not transient or not self.retry.allows_retry(
                attempts, time.monotonic() - started, delay
            ):
                raise StorageError(f"{action} failed after {attempts} attempts: {failure}")
            logger.warning(
                "S3 request failed, retrying",
                extra={
                    **log_ids,
                    "action": action,
                    "attempt": attempts,
                    "retry_in_seconds": round(delay, 3),
                    "error": failure,
                },
            )
            await asyncio.sleep(delay)


def _describe(error: Exception) -> str:
    if isinstance(error, ClientError):
        details = error.response.get("Error", {})
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"HTTP {status} {details.get('Code')}: {details.get('Message')}"
    return f"{type(error).__name__}: {error}"


def _is_transient(error: Exception) -> bool:
    if isinstance(error, (NoCredentialsError, ParamValidationError)):
        return False
    if not isinstance(error, ClientError):
        # Connection errors, timeouts and other failures below the HTTP layer.
        return True
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    code = error.response.get("Error", {}).get("Code")
    return status >= 500 or status in (408, 429) or code in _TRANSIENT_CODES
