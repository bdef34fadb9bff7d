"""A corpus of bad inputs: JSONL files in tests/bad_input/ and bad API bodies and paths.

Every case must get a 4xx whose message names the problem (the line, the field or the limit),
never a 5xx, and a rejected submit must leave no job and no chunk behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chalicelib import aws
from chalicelib.http import MAX_BODY_BYTES
from chalicelib.validation import MAX_LINE_BYTES
from tests import support

CORPUS = Path(__file__).resolve().parent / "bad_input"

# file -> (line named in the error, field of that error or None, text the message contains)
BAD_FILES = {
    "truncated_line.jsonl": (3, None, "invalid JSON"),
    "byte_order_mark.jsonl": (1, None, "byte order mark"),
    "non_utf8.jsonl": (2, None, "invalid UTF-8"),
    "duplicate_custom_id.jsonl": (4, "custom_id", "duplicates line 2"),
    "wrong_types.jsonl": (2, "body.messages", "must be a non-empty list"),
    "custom_id_number.jsonl": (2, "custom_id", "must be a string"),
    "missing_method.jsonl": (2, "method", "missing method"),
    "missing_body.jsonl": (2, "body", "missing body"),
    "stream_true.jsonl": (2, "body.stream", "cannot be streamed"),
    "unknown_url.jsonl": (2, "url", "/v1/embeddings"),
    "not_an_object.jsonl": (2, None, "expected a JSON object"),
}


def job_ids(client) -> list[str]:
    response = support.get(client, "/jobs")
    assert response.status_code == 200
    return [job["job_id"] for job in response.json_body["jobs"]]


def chunk_items(settings) -> int:
    return aws.client("dynamodb").scan(TableName=settings.chunks_table, Select="COUNT")["Count"]


def submit_file(client, settings, data: bytes, key: str = "inputs/corpus.jsonl"):
    uri = support.upload(settings.bucket, key, data)
    return support.post(client, "/submit/batch", {"model_name": "org/Tiny-1B", "input_file": uri})


def assert_nothing_created(client, settings, jobs_before: list[str]) -> None:
    assert job_ids(client) == jobs_before
    assert chunk_items(settings) == 0


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_names_line_and_leaves_nothing(client, aws_account, name):
    line, field, text = BAD_FILES[name]
    response = submit_file(client, aws_account, (CORPUS / name).read_bytes())
    assert response.status_code == 400, response.body
    body = response.json_body
    assert body["code"] == "invalid_input"
    first = body["errors"][0]
    assert first["line"] == line
    assert first["field"] == field
    assert text in first["message"]
    assert f"line {line}" in body["message"]
    assert_nothing_created(client, aws_account, [])


def test_corpus_has_no_untested_file():
    files = {path.name for path in CORPUS.glob("*.jsonl")}
    assert files == set(BAD_FILES) | {"crlf_line_endings.jsonl"}


def test_crlf_file_is_accepted(client, aws_account):
    response = submit_file(client, aws_account, (CORPUS / "crlf_line_endings.jsonl").read_bytes())
    assert response.status_code == 200, response.body
    assert response.json_body["input_stats"]["num_lines"] == 3


def test_ten_megabyte_line_is_rejected_by_line(client, aws_account):
    good = support.jsonl([support.request_line("ok")])
    huge = support.jsonl([support.request_line("huge", content="a" * 10_000_000)])
    response = submit_file(client, aws_account, good + huge + good.replace(b'"ok"', b'"ok2"'))
    assert response.status_code == 400, response.body
    first = response.json_body["errors"][0]
    assert first["line"] == 2
    assert str(MAX_LINE_BYTES) in first["message"]
    assert_nothing_created(client, aws_account, [])


# Bad API bodies. Each entry: (path template, body, field named in the message, text in it).
SUBMIT = "/submit/batch"
BAD_SUBMIT_BODIES = [
    ({"model_name": 5}, "model_name", "valid string"),
    ({"replicas": "2"}, "replicas", "valid integer"),
    ({"replicas": True}, "replicas", "valid integer"),
    ({"force": "yes"}, "force", "valid boolean"),
    ({"tp_size": True}, "tp_size", "not a boolean"),
    ({"chunk_size": 2.5}, "chunk_size", "valid integer"),
    ({"surprise": 1}, "surprise", "unknown field"),
    ({"slo_deadline_hours": 1e308}, "slo_deadline_hours", "less than or equal to 720"),
    ({"replicas": 10**30}, "replicas", "less than or equal to 1024"),
    ({"chunk_size": -5}, "chunk_size", "greater than or equal to 1"),
    ({"replicas": 0}, "replicas", "greater than or equal to 1"),
    ({"input_file": "s3://bucket/../../etc/passwd\n"}, "input_file", "input_file"),
    ({"description": "\ud800"}, "description", "valid string"),
]


@pytest.mark.parametrize("extra, field, text", BAD_SUBMIT_BODIES)
def test_bad_submit_body_names_field(client, aws_account, extra, field, text):
    body = {"model_name": "org/Tiny-1B", "input_file": f"s3://{aws_account.bucket}/a.jsonl"}
    body.update(extra)
    response = support.post(client, SUBMIT, body)
    assert response.status_code == 400, response.body
    assert field in response.json_body["message"]
    assert text in response.json_body["message"]
    assert_nothing_created(client, aws_account, [])


@pytest.fixture
def running_job(client, aws_account):
    job = support.submit_job(client, aws_account, num_requests=4, chunk_size=2)
    tokens = support.add_replicas(client, job["job_id"], 1)
    ((replica_id, token),) = tokens.items()
    return job["job_id"], replica_id, token


USER_BODIES = [
    ("/job/{job}/scale", {"count": -1}, "count"),
    ("/job/{job}/scale", {"count": "2"}, "count"),
    ("/job/{job}/scale", {"count": 10**30}, "count"),
    ("/job/{job}/scale", {"count": 1, "force": "yes"}, "force"),
    ("/job/{job}/scale", {"count": 1, "on_demand": 1}, "on_demand"),
    ("/job/{job}/swap", {"num_replicas": 0}, "num_replicas"),
    ("/job/{job}/swap", {"ready_threshold": 1e308}, "ready_threshold"),
    ("/job/{job}/swap", {"cancel": "true"}, "cancel"),
    ("/job/{job}/kill", {"replica_ids": []}, "replica_ids"),
    ("/job/{job}/kill", {"replica_ids": ["../r0"]}, "replica_ids"),
    ("/job/{job}/kill", {"replica_ids": "r0"}, "replica_ids"),
    ("/uploads", {"filename": "../etc/passwd"}, "filename"),
    ("/uploads", {"filename": "a.jsonl", "size_bytes": -1}, "size_bytes"),
    ("/test/placement", {"model_name": "m", "num_lines": 10**30}, "num_lines"),
]


@pytest.mark.parametrize("path, body, field", USER_BODIES)
def test_bad_user_body_names_field(client, running_job, path, body, field):
    job_id, _, _ = running_job
    response = support.post(client, path.format(job=job_id), body)
    assert response.status_code == 400, response.body
    assert field in response.json_body["message"]


REPLICA_BODIES = [
    ("chunks/pull", {"replica_id": "../../x"}, "replica_id"),
    ("chunks/renew", {"chunk_id": "../c000001", "lease_token": "x" * 20}, "chunk_id"),
    (
        "chunks/complete",
        {"chunk_id": "c000000", "lease_token": "t" * 20, "requests_failed": -1},
        "requests_failed",
    ),
    (
        "chunks/complete",
        {"chunk_id": "c000000", "lease_token": "t" * 20, "prompt_tokens": 10**30},
        "prompt_tokens",
    ),
    ("chunks/release", {"chunk_id": "c000000", "lease_token": "t" * 20, "reason": 3}, "reason"),
    ("phase", {"phase": "flying"}, "phase"),
    ("heartbeat", {"extra": True}, "extra"),
    ("metrics/ingest", {"session": "s", "snapshots": [{"seq": 10**40, "timestamp": 1.0}]}, "seq"),
    (
        "metrics/ingest",
        {"session": "s", "snapshots": [{"seq": 1, "timestamp": 5e-324}]},
        "timestamp",
    ),
    ("metrics/summary", {"metrics": {"tokens": 1e300}}, "metrics.tokens"),
    ("metrics/summary", {"metrics": {"tokens": 10**40}}, "metrics.tokens"),
    ("metrics/summary", {"metrics": {"note": "\ud800"}}, "metrics.note"),
]


@pytest.mark.parametrize("route, body, field", REPLICA_BODIES)
def test_bad_replica_body_names_field(client, running_job, route, body, field):
    job_id, replica_id, token = running_job
    payload = {"replica_id": replica_id, **body}
    response = support.post(client, f"/job/{job_id}/{route}", payload, token)
    assert response.status_code == 400, response.body
    assert field in response.json_body["message"]


TRAVERSAL_PATHS = [
    "/job/..%2F..%2Fetc",
    "/job/%2e%2e",
    "/job/%2E%2E%2Fjobs",
    "/job/a%2Fb/replicas",
    "/job/UPPER/metrics",
    "/analytics/runs/..%2Fx",
    "/job/ok-id/replicas/..%2Fr0/metrics",
]


@pytest.mark.parametrize("path", TRAVERSAL_PATHS)
def test_path_traversal_in_ids_is_400(client, aws_account, path):
    response = support.get(client, path)
    assert response.status_code == 400, response.body
    assert "is not a valid id" in response.json_body["message"]


@pytest.mark.parametrize("path", ["/job/../jobs", "/job/a/b", "/job/./x/y/z"])
def test_slashes_in_ids_match_no_route(client, aws_account, path):
    response = support.get(client, path)
    assert 400 <= response.status_code < 500


def test_traversal_in_replica_route_id_is_400(client, running_job):
    _, replica_id, token = running_job
    response = support.post(
        client, "/job/..%2F..%2Fx/chunks/pull", {"replica_id": replica_id}, token
    )
    assert response.status_code == 400
    assert "job_id" in response.json_body["message"]


@pytest.mark.parametrize("size", [MAX_BODY_BYTES + 1, 10 * 1024 * 1024])
def test_oversized_body_is_413(client, aws_account, size):
    padding = "a" * size
    body = json.dumps({"model_name": "m", "input_file": "s3://b/k", "description": padding})
    response = client.http.post(
        SUBMIT, headers={"Content-Type": "application/json"}, body=body.encode()
    )
    assert response.status_code == 413
    assert str(MAX_BODY_BYTES) in response.json_body["message"]
    assert_nothing_created(client, aws_account, [])


@pytest.mark.parametrize(
    "raw, text",
    [
        (b"[1, 2]", "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b'{"model_name": "m",', "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_malformed_json_body_is_400(client, aws_account, raw, text):
    response = client.http.post(SUBMIT, headers={"Content-Type": "application/json"}, body=raw)
    assert response.status_code == 400
    assert text in response.json_body["message"]
    assert_nothing_created(client, aws_account, [])


@pytest.mark.parametrize("raw", ["1_0", "%205", "%D9%A3", "1e2", "1" * 5000, "-3"])
def test_invalid_limit_query_is_400(client, aws_account, raw):
    response = support.get(client, f"/jobs?limit={raw}")
    assert response.status_code == 400, response.body
    assert response.json_body["field"] == "limit"
