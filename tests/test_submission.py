"""Job submission and input validation through ``POST /submit/batch``."""

from __future__ import annotations

import json

import pytest

from chalicelib import aws
from tests import support


def chunk_count(settings) -> int:
    return aws.client("dynamodb").scan(TableName=settings.chunks_table, Select="COUNT")["Count"]


def job_count(settings) -> int:
    return aws.client("dynamodb").scan(TableName=settings.jobs_table, Select="COUNT")["Count"]


def submit_bytes(client, settings, data: bytes, **options):
    uri = support.upload(settings.bucket, "inputs/bad.jsonl", data)
    return support.post(
        client, "/submit/batch", {"model_name": "org/Tiny-1B", "input_file": uri, **options}
    )


GOOD = [support.request_line(f"req-{i}") for i in range(3)]


def line(record) -> bytes:
    return json.dumps(record).encode() + b"\n"


BAD_FILES = {
    "duplicate custom_id": (
        support.jsonl([*GOOD, support.request_line("req-1")]),
        4,
        "req-1",
    ),
    "non-JSON line": (
        support.jsonl(GOOD[:1]) + b"{not json\n" + support.jsonl(GOOD[1:]),
        2,
        "JSON",
    ),
    "wrong url": (
        support.jsonl(GOOD[:2]) + line({**support.request_line("req-9"), "url": "/v1/embeddings"}),
        3,
        "/v1/embeddings",
    ),
    "missing custom_id": (
        support.jsonl(GOOD)
        + line({k: v for k, v in support.request_line("x").items() if k != "custom_id"}),
        4,
        "custom_id",
    ),
    "2 MB line": (
        support.jsonl(GOOD[:1])
        + line(support.request_line("big", content="a" * 2_000_000))
        + support.jsonl(GOOD[1:]),
        2,
        "1000000",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_input_names_line_and_creates_nothing(client, aws_account, case):
    data, bad_line, mentioned = BAD_FILES[case]
    response = submit_bytes(client, aws_account, data)
    assert response.status_code == 400, response.body
    body = response.json_body
    assert body["code"] == "invalid_input"
    lines = [error["line"] for error in body["errors"]]
    assert bad_line in lines
    assert f"line {bad_line}" in body["message"]
    assert mentioned in body["message"]
    assert chunk_count(aws_account) == 0
    assert job_count(aws_account) == 0


def test_empty_file_is_rejected(client, aws_account):
    response = submit_bytes(client, aws_account, b"")
    assert response.status_code == 400
    assert "empty" in response.json_body["message"]
    assert job_count(aws_account) == 0


def test_blank_only_file_is_rejected(client, aws_account):
    response = submit_bytes(client, aws_account, b"\n  \n\n")
    assert response.status_code == 400
    assert "no requests" in response.json_body["message"]
    assert chunk_count(aws_account) == 0


def test_missing_input_object_names_uri(client, aws_account):
    response = support.post(
        client,
        "/submit/batch",
        {"model_name": "m", "input_file": f"s3://{aws_account.bucket}/nope.jsonl"},
    )
    assert response.status_code == 400
    assert "nope.jsonl" in response.json_body["message"]


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("tp_size", 3, "tp_size"),
        ("pp_size", 5, "pp_size"),
        ("chunk_size", 0, "chunk_size"),
        ("slo_deadline_hours", -1, "slo_deadline_hours"),
        ("placement_solver", "llm", "roofline"),
        ("input_file", "/etc/passwd", "input_file"),
        ("surprise", 1, "unknown field 'surprise'"),
    ],
)
def test_invalid_option_names_field_and_value(client, aws_account, field, value, expected):
    body = {"model_name": "m", "input_file": f"s3://{aws_account.bucket}/a.jsonl", field: value}
    response = support.post(client, "/submit/batch", body)
    assert response.status_code == 400, response.body
    assert expected in response.json_body["message"]
    assert response.json_body["errors"][0]["field"] == field


def test_missing_model_name_is_reported(client, aws_account):
    response = support.post(
        client, "/submit/batch", {"input_file": f"s3://{aws_account.bucket}/a.jsonl"}
    )
    assert response.status_code == 400
    assert "model_name" in response.json_body["message"]


def test_non_json_body_is_400(client, aws_account):
    response = client.http.post(
        "/submit/batch", headers={"Content-Type": "application/json"}, body=b"{oops"
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json_body["message"]


def test_submit_records_stats_and_chunks(client, aws_account):
    submitted = support.submit_job(client, aws_account, num_requests=7, chunk_size=3)
    assert submitted["status"] == "queued"
    assert submitted["chunks"] == 3
    assert submitted["input_stats"]["num_lines"] == 7
    assert submitted["input_stats"]["avg_input_tokens"] >= 1
    job = support.get(client, f"/job/{submitted['job_id']}").json_body
    assert job["status"] == "queued"
    assert job["chunks"] == {
        "total": 3,
        "pending": 3,
        "inflight": 0,
        "completed": 0,
        "failed": 0,
        "all_done": False,
    }
    assert job["model_name"] == "org/Tiny-1B"
    assert job["output_location"].startswith(f"s3://{aws_account.bucket}/jobs/")


def test_large_input_validates_in_background(client, aws_account, monkeypatch):
    monkeypatch.setenv("TANDEMN_SYNC_VALIDATION_MAX_BYTES", "10")
    data = support.jsonl(GOOD) + b"{broken\n"
    response = submit_bytes(client, aws_account, data)
    assert response.status_code == 200
    assert response.json_body["status"] == "validating"
    job = support.get(client, f"/job/{response.json_body['job_id']}").json_body
    assert job["status"] == "failed"
    assert job["validation_errors"][0]["line"] == 4
    assert chunk_count(aws_account) == 0


def test_large_valid_input_is_queued_after_background_validation(client, aws_account, monkeypatch):
    monkeypatch.setenv("TANDEMN_SYNC_VALIDATION_MAX_BYTES", "10")
    response = submit_bytes(client, aws_account, support.jsonl(GOOD), chunk_size=2)
    job = support.get(client, f"/job/{response.json_body['job_id']}").json_body
    assert job["status"] == "queued"
    assert job["chunks"]["total"] == 2


def test_jobs_listing_is_newest_first_and_paged(client, aws_account):
    ids = [
        support.submit_job(client, aws_account, num_requests=1, chunk_size=1)["job_id"]
        for _ in range(3)
    ]
    first = support.get(client, "/jobs?limit=2").json_body
    assert [j["job_id"] for j in first["jobs"]] == ids[::-1][:2]
    second = support.get(client, f"/jobs?limit=2&next_token={first['next_token']}").json_body
    assert [j["job_id"] for j in second["jobs"]] == ids[:1]


def test_unknown_job_is_404_and_bad_id_is_400(client, aws_account):
    assert support.get(client, "/job/does-not-exist").status_code == 404
    response = support.get(client, "/job/..%2F..%2Fetc")
    assert response.status_code == 400
    assert "job_id" in response.json_body["message"]


def test_watchdog_restarts_stale_validation(client, aws_account, monkeypatch):
    from chalicelib import jobs, submission, watchdog

    monkeypatch.setenv("TANDEMN_SYNC_VALIDATION_MAX_BYTES", "10")
    # The first validator dies before doing anything.
    monkeypatch.setattr(submission, "validate_in_background", lambda settings, job_id: None)
    response = submit_bytes(client, aws_account, support.jsonl(GOOD), chunk_size=2)
    job_id = response.json_body["job_id"]
    assert jobs.get_job(aws_account, job_id)["status"] == "validating"

    monkeypatch.undo()
    monkeypatch.setattr(watchdog, "_now", lambda: 10**10)
    watchdog.run_once(aws_account)
    assert jobs.get_job(aws_account, job_id)["status"] == "queued"


def test_forged_page_token_is_400(client, aws_account):
    import base64

    forged = base64.urlsafe_b64encode(json.dumps({"job_id": {"S": "zzz"}}).encode()).decode()
    response = support.get(client, f"/jobs?next_token={forged}")
    assert response.status_code == 400
    assert response.json_body["field"] == "next_token"
    bad_number = base64.urlsafe_b64encode(
        json.dumps({"job_id": "a-b", "created_at": "abc"}).encode()
    ).decode()
    assert support.get(client, f"/jobs?next_token={bad_number}").status_code == 400


def test_nan_in_body_is_rejected(client, aws_account):
    body = b'{"model_name": "m", "input_file": "s3://b/k", "slo_deadline_hours": NaN}'
    response = client.http.post("/submit/batch", headers={"Content-Type": "application/json"}, body=body)
    assert response.status_code == 400
    assert "NaN" in response.json_body["message"]
    assert "finite" in response.json_body["message"]


def test_model_not_served_is_rejected(client, aws_account, monkeypatch):
    monkeypatch.setenv("TANDEMN_SERVED_MODELS", "org/Served-1B")
    response = submit_bytes(client, aws_account, support.jsonl(GOOD))
    assert response.status_code == 400, response.body
    assert response.json_body["field"] == "model_name"
    assert "'org/Tiny-1B'" in response.json_body["message"]
    assert "org/Served-1B" in response.json_body["message"]
    assert job_count(aws_account) == 0


def test_served_model_is_accepted(client, aws_account, monkeypatch):
    monkeypatch.setenv("TANDEMN_SERVED_MODELS", "org/Other-7B, org/Tiny-1B")
    response = submit_bytes(client, aws_account, support.jsonl(GOOD))
    assert response.status_code == 200, response.body
