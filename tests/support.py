"""Helpers that drive the API the way a user and a replica would."""

from __future__ import annotations

import json
from typing import Any

from chalicelib import aws


def request_line(
    custom_id: str, content: str = "Say hello.", max_tokens: int = 16
) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "m",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
        },
    }


def jsonl(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def upload(bucket: str, key: str, data: bytes) -> str:
    aws.client("s3").put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}"


def post(client, path: str, body: dict[str, Any] | None = None, token: str | None = None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return client.http.post(path, headers=headers, body=json.dumps(body or {}).encode())


def get(client, path: str, token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.http.get(path, headers=headers)


def submit_job(
    client, settings, num_requests: int, chunk_size: int, **options: Any
) -> dict[str, Any]:
    data = jsonl([request_line(f"req-{i:05d}") for i in range(num_requests)])
    uri = upload(settings.bucket, "inputs/batch.jsonl", data)
    response = post(
        client,
        "/submit/batch",
        {"model_name": "org/Tiny-1B", "input_file": uri, "chunk_size": chunk_size, **options},
    )
    assert response.status_code == 200, response.body
    return response.json_body


def add_replicas(client, job_id: str, count: int) -> dict[str, str]:
    response = post(client, f"/job/{job_id}/scale", {"count": count, "provider": "external"})
    assert response.status_code == 200, response.body
    return response.json_body["replica_tokens"]


def pull(client, job_id: str, replica_id: str, token: str):
    return post(client, f"/job/{job_id}/chunks/pull", {"replica_id": replica_id}, token)


def read_range(lease: dict[str, Any]) -> list[dict[str, Any]]:
    """Returns the input requests of a lease's byte range."""
    body = (
        aws.client("s3")
        .get_object(
            Bucket=lease["input_bucket"],
            Key=lease["input_key"],
            Range=f"bytes={lease['byte_start']}-{lease['byte_end'] - 1}",
        )["Body"]
        .read()
    )
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def write_output(
    settings, lease: dict[str, Any], records: list[dict[str, Any]] | None = None
) -> None:
    """Writes an attempt's output the way the sidecar does: one record per input request."""
    if records is None:
        records = []
        for request in read_range(lease):
            custom_id = request["custom_id"]
            records.append(
                {
                    "id": f"batch_req_{custom_id}",
                    "custom_id": custom_id,
                    "response": {
                        "status_code": 200,
                        "request_id": custom_id,
                        "body": {"choices": [{"message": {"role": "assistant", "content": "hi"}}]},
                    },
                    "error": None,
                }
            )
    aws.client("s3").put_object(
        Bucket=settings.bucket, Key=lease["output_key"], Body=jsonl(records)
    )


def complete(client, job_id: str, replica_id: str, token: str, lease: dict[str, Any]):
    return post(
        client,
        f"/job/{job_id}/chunks/complete",
        {
            "replica_id": replica_id,
            "chunk_id": lease["chunk_id"],
            "lease_token": lease["lease_token"],
            "output_key": lease["output_key"],
        },
        token,
    )


def read_jsonl(bucket: str, key: str) -> list[dict[str, Any]]:
    body = aws.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    return [json.loads(line) for line in body.splitlines() if line.strip()]
