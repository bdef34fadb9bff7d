"""The dashboard's routes: its payload and bounds, tokens, server-sent events, time series, the
page and ``tandemn web``. The page in a real browser is in tests/test_dashboard_browser.py."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import time

import httpx
import pytest
from typer.testing import CliRunner

from chalicelib import aws, dashboard, dynamo, jobs
from chalicelib.states import JobStatus
from tandemn import cli_web
from tandemn.cli import app as cli_app
from tests import support
from tests.conftest import PROJECT_DIR
from tests.dashboard_seed import seed_job, seed_jobs


@pytest.fixture(autouse=True)
def fresh_caches():
    dashboard.clear_caches()
    yield
    dashboard.clear_caches()


def mint(client, ttl: int | None = None) -> str:
    response = support.post(client, "/dashboard/token", {} if ttl is None else {"ttl_seconds": ttl})
    assert response.status_code == 200, response.body
    return response.json_body["token"]


def poll(client, token: str | None, query: str = ""):
    separator = "&" if query else ""
    path = "/dashboard/poll?" + (f"token={token}" if token else "") + separator + query
    return client.http.get(path)


def count_dynamodb_calls():
    """Counts the DynamoDB operations the process sends, by name, until the returned list is read."""
    calls: list[str] = []

    def record(model, **kwargs):
        calls.append(model.name)

    aws.client("dynamodb").meta.events.register("before-call.dynamodb", record)
    return calls


# Payload size and bounds.


def test_poll_payload_of_20_jobs_with_16_replicas_stays_under_500_kb(client, aws_account):
    ids = seed_jobs(aws_account, 20, 16, history=60)
    token = mint(client)

    response = poll(client, token, f"job={ids[0]}")

    assert response.status_code == 200, response.body
    body = response.body
    assert len(body) < 500 * 1024
    payload = json.loads(body)
    assert len(payload["jobs"]) == 20
    assert all(len(payload["replicas"][job_id]) == 16 for job_id in ids)
    series = payload["timeseries"][ids[0]]
    assert series["mode"] == "full"
    assert 0 < len(series["points"]) <= dashboard.SERIES_POINTS + 1
    assert series["fields"][0] == "t"


def test_poll_lists_recent_and_active_jobs_with_bounded_reads(client, aws_account):
    newest = seed_jobs(aws_account, 20, 1)
    # Older than the 20 newest: two jobs that still run and two that finished.
    still_running = [seed_job(aws_account, 100 + i, 1) for i in range(2)]
    finished = [seed_job(aws_account, 110 + i, 1, status=JobStatus.SUCCEEDED) for i in range(2)]
    for job_id, created in [(j, "1000") for j in still_running] + [(j, "2000") for j in finished]:
        aws.client("dynamodb").update_item(
            TableName=aws_account.jobs_table,
            Key={"job_id": {"S": job_id}},
            UpdateExpression="SET created_at = :old",
            ExpressionAttributeValues={":old": {"N": created}},
        )
    calls = count_dynamodb_calls()

    payload = dashboard.build_payload(aws_account)

    listed = [job["job_id"] for job in payload["jobs"]]
    assert sorted(listed) == sorted(newest + still_running)
    assert "Scan" not in calls
    # Two index queries, one BatchGetItem, three queries per job and one for the series.
    assert calls.count("Query") == 2 + 3 * len(listed) + 1
    assert calls.count("BatchGetItem") == 1


def test_final_job_is_read_once_and_frozen(client, aws_account):
    job_id = seed_job(aws_account, 1, 2, status=JobStatus.SUCCEEDED)
    first = dashboard.build_payload(aws_account, selected=job_id)
    assert first["jobs"][0]["final"] is True
    # A change after the job ended does not reach the payload: its numbers are frozen.
    aws.client("dynamodb").update_item(
        TableName=aws_account.replicas_table,
        Key={"job_id": {"S": job_id}, "replica_id": {"S": f"{job_id}-r0"}},
        UpdateExpression="SET chunks_completed = :n",
        ExpressionAttributeValues={":n": {"N": "999"}},
    )
    calls = count_dynamodb_calls()

    second = dashboard.build_payload(aws_account, selected=job_id)

    assert second["replicas"][job_id] == first["replicas"][job_id]
    assert second["timeseries"][job_id]["final"] is True
    assert calls.count("Query") == 2
    assert "BatchGetItem" not in calls


def test_payload_carries_workload_replicas_cost_events_and_quota(client, aws_account):
    job_id = seed_job(aws_account, 3, 4)

    payload = dashboard.build_payload(aws_account)

    assert payload["selected"] == job_id
    job = payload["jobs"][0]
    assert job["model_name"] == "Qwen/Qwen2.5-7B-Instruct"
    assert job["final"] is False
    chunks = payload["chunks"][job_id]
    assert chunks["pending"] + chunks["inflight"] + chunks["completed"] + chunks["failed"] == 100
    node = payload["replicas"][job_id][0]
    assert (node["gpu_type"], node["tp_size"], node["pp_size"]) == ("L40S", 4, 1)
    assert {node["group"] for node in payload["replicas"][job_id]} <= set(
        dashboard.PHASE_GROUPS.values()
    )
    assert payload["replicas"][job_id][3]["group"] == "launching"  # loading_model
    assert payload["cost"][job_id]["accrued_usd"] > 0
    assert payload["cost"][job_id]["deadline_at"] == pytest.approx(job["created_at"] + 7200)
    assert payload["cost"][job_id]["deadline_missed_by_sec"] is None
    assert payload["metrics"][job_id]["num_requests_running"] == 8 * 3  # 3 running replicas
    assert len(payload["events"][job_id]) == dashboard.EVENTS_PER_JOB
    assert payload["quota"]["source"] == "static"
    assert {pool["family"] for pool in payload["quota"]["pools"]} == {"G", "P"}


def test_payload_shows_missed_deadline(client, aws_account):
    job_id = seed_job(aws_account, 1, 1)
    created = jobs.get_job(aws_account, job_id)["created_at"]
    # The seeded job has a 2 h deadline and finishes an hour after it.
    aws.client("dynamodb").update_item(
        TableName=aws_account.jobs_table,
        Key={"job_id": {"S": job_id}},
        UpdateExpression="SET #status = :done, finished_at = :finished",
        ExpressionAttributeNames={"#status": "status"},
        ExpressionAttributeValues=dynamo.serialize(
            {":done": "succeeded", ":finished": float(created) + 3 * 3600}
        ),
    )
    payload = dashboard.build_payload(aws_account)
    assert payload["cost"][job_id]["deadline_missed_by_sec"] == pytest.approx(3600, abs=1)


def test_unknown_selected_job_falls_back_to_the_newest(client, aws_account):
    job_id = seed_job(aws_account, 1, 1)
    token = mint(client)
    payload = poll(client, token, "job=no-such-job-1234").json_body
    assert payload["selected"] == job_id
    response = poll(client, token, "job=Bad_Id")
    assert response.status_code == 400
    assert response.json_body["field"] == "job"


# Time series.


def row(replica: str, t: float, done: float, latency: dict[str, float], **gauges) -> dict:
    return {
        "replica_id": replica,
        "timestamp": t,
        "rates": {"generation": 100.0},
        "gauges": gauges,
        "counters": {"request_success": done},
        "histograms": {dashboard.LATENCY_HISTOGRAM: {"buckets": latency}},
    }


def test_series_points_count_completions_and_latency_per_step():
    rows = [
        row("a", 1001.0, 2, {"1.0": 2, "+Inf": 2}, num_requests_running=4),
        row("b", 1002.0, 1, {"1.0": 0, "+Inf": 1}, num_requests_running=2),
        row("a", 1011.0, 5, {"1.0": 5, "+Inf": 5}, num_requests_running=3),
    ]

    points = dashboard.series_points(rows, 10.0, from_start=True)

    assert [p[0] for p in points] == [1010.0, 1020.0]
    first, second = points
    assert first[9] == 3  # a: 2 from zero, b: 1 from zero
    assert first[1] == 200.0 and first[3] == 6
    assert second[9] == 3  # a went from 2 to 5
    # Only a's 3 requests, all at most 1 s, finished in the second step.
    assert second[6] is not None and second[6] <= 1000.0
    not_from_start = dashboard.series_points(rows, 10.0, from_start=False)
    assert not_from_start[0][9] == 0


def test_series_step_covers_the_job_in_at_most_60_points():
    assert dashboard.series_step(100) == 5
    assert dashboard.series_step(3600) == 60
    assert dashboard.series_step(20 * 86400) == 43200
    assert dashboard.series_step(365 * 86400) == 86400  # the largest step


def test_delta_series_returns_only_recent_steps(client, aws_account):
    job_id = seed_job(aws_account, 1, 2, snapshots_per_replica=40)
    full = dashboard.build_payload(aws_account, selected=job_id)["timeseries"][job_id]
    assert full["mode"] == "full"

    since = time.time()
    delta = dashboard.build_payload(aws_account, selected=job_id, since=since)
    series = delta["timeseries"][job_id]

    assert series["mode"] == "delta"
    assert series["step_sec"] == full["step_sec"]
    assert 0 < len(series["points"]) < len(full["points"])
    window = max(dashboard.DELTA_REPLACE_SECONDS, 2 * series["step_sec"])
    assert all(p[0] > since - window for p in series["points"])
    stale = dashboard.build_payload(aws_account, selected=job_id, since=since - 3600)
    assert stale["timeseries"][job_id]["mode"] == "full"


# Server-sent events.


def test_stream_answers_one_event_and_uses_last_event_id(client, aws_account):
    job_id = seed_job(aws_account, 1, 2, snapshots_per_replica=10)
    token = mint(client)

    response = client.http.get(f"/dashboard/stream?token={token}&job={job_id}")

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    text = response.body.decode()
    lines = text.split("\n")
    assert lines[0].startswith(": ")
    assert lines[1] == "retry: 3000"
    data = next(line for line in lines if line.startswith("data: "))
    payload = json.loads(data[len("data: ") :])
    assert payload["timeseries"][job_id]["mode"] == "full"
    event_id = next(line for line in lines if line.startswith("id: "))[len("id: ") :]

    again = client.http.get(
        f"/dashboard/stream?token={token}&job={job_id}", headers={"Last-Event-ID": event_id}
    )
    data = next(line for line in again.body.decode().split("\n") if line.startswith("data: "))
    assert json.loads(data[len("data: ") :])["timeseries"][job_id]["mode"] == "delta"


def test_stream_rejects_a_bad_since(client, aws_account):
    token = mint(client)
    response = client.http.get(f"/dashboard/stream?token={token}&since=yesterday")
    assert response.status_code == 400
    assert response.json_body["field"] == "since"


# Tokens.


@pytest.mark.parametrize("path", ["/dashboard", "/dashboard/poll", "/dashboard/stream"])
def test_routes_reject_requests_without_a_token(client, aws_account, path):
    response = client.http.get(path)
    assert response.status_code == 401
    assert response.json_body["code"] == "unauthorized"
    assert "tandemn web" in response.json_body["message"]


def test_token_is_accepted_in_the_query_and_as_bearer(client, aws_account):
    token = mint(client)
    assert token.startswith("tdb_")
    assert poll(client, token).status_code == 200
    bearer = client.http.get("/dashboard/poll", headers={"Authorization": f"Bearer {token}"})
    assert bearer.status_code == 200


def test_tampered_token_is_rejected(client, aws_account):
    token = mint(client)
    claims_text, signature = token[len("tdb_") :].split(".")
    claims = json.loads(base64.urlsafe_b64decode(claims_text + "=" * (-len(claims_text) % 4)))
    claims["exp"] += 86400
    forged = (
        "tdb_"
        + base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
        + "."
        + signature
    )
    response = poll(client, forged)
    assert response.status_code == 401
    assert "signature" in response.json_body["message"]
    assert poll(client, "tdb_garbage").status_code == 401


def test_expired_token_is_rejected_with_its_expiry(client, aws_account):
    token = mint(client, ttl=60)
    assert dashboard.verify_token(aws_account, token)["exp"] > time.time()
    with pytest.raises(dashboard.Unauthorized, match="expired at"):
        dashboard.verify_token(aws_account, token, now=time.time() + 61)


def test_token_ttl_out_of_range_is_rejected(client, aws_account):
    response = support.post(client, "/dashboard/token", {"ttl_seconds": 10})
    assert response.status_code == 400
    assert "ttl_seconds" in response.json_body["message"]


def test_token_signed_by_a_replaced_key_is_rejected(client, aws_account):
    token = mint(client)
    aws.client("dynamodb").delete_item(
        TableName=aws_account.connections_table,
        Key={"connection_id": {"S": dashboard.KEY_CONNECTION_ID}, "topic": {"S": "key"}},
    )
    dashboard.clear_caches()
    mint(client)  # creates a new key
    response = poll(client, token)
    assert response.status_code == 401


def test_local_stage_needs_no_token(aws_account):
    # Chalice's test client sets the test stage's variables on each call, so the local stage's
    # settings are passed directly.
    local = dataclasses.replace(aws_account, stage="local")
    dashboard.authorize(local, {}, None)
    html, _ = dashboard.page(local)
    config = json.loads(re.search(r'id="config">(.*?)</script>', html).group(1))
    assert config["token_required"] is False
    with pytest.raises(dashboard.Unauthorized):
        dashboard.authorize(aws_account, {}, None)


def test_websocket_token_needs_a_dashboard_token(client, aws_account):
    rejected = client.http.post(
        "/dashboard/ws-token", headers={"Content-Type": "application/json"}, body=b"{}"
    )
    assert rejected.status_code == 401
    token = mint(client)
    issued = client.http.post(
        "/dashboard/ws-token",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        body=b"{}",
    )
    assert issued.status_code == 200
    assert issued.json_body["token"].startswith("wst_")


# The page.


def test_page_is_self_contained_and_its_script_matches_the_policy(client, aws_account, monkeypatch):
    monkeypatch.setenv("TANDEMN_WEBSOCKET_URL", "wss://abc.execute-api.us-east-1.amazonaws.com/api")
    token = mint(client)

    response = client.http.get(f"/dashboard?token={token}")

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    html = response.body.decode()
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    assert "{{CONFIG}}" not in html
    config = json.loads(re.search(r'id="config">(.*?)</script>', html).group(1))
    assert config["websocket_url"].startswith("wss://")
    assert config["token_required"] is True
    policy = response.headers["Content-Security-Policy"]
    script = re.search(r"<script>(.*?)</script>", html, re.DOTALL).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in policy
    assert "wss://abc.execute-api.us-east-1.amazonaws.com/api" in policy
    assert response.headers["Referrer-Policy"] == "no-referrer"


def test_page_is_packaged_with_chalicelib():
    from chalice.deploy.packager import BaseLambdaDeploymentPackager
    from chalice.utils import OSUtils

    packager = BaseLambdaDeploymentPackager(OSUtils(), None, None)
    names = [zip_path for _, zip_path in packager._iter_app_filenames(str(PROJECT_DIR))]
    assert "chalicelib/dashboard.html" in names


# tandemn web.

runner = CliRunner()


def test_web_prints_the_local_url_without_a_token():
    result = runner.invoke(cli_app, ["web", "--print", "--api-url", "http://127.0.0.1:26336"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "http://127.0.0.1:26336/dashboard"


def test_web_opens_the_browser_on_the_job(monkeypatch):
    opened = []
    monkeypatch.setattr(cli_web.webbrowser, "open", lambda url: opened.append(url) or True)
    result = runner.invoke(cli_app, ["web", "job-1", "--api-url", "http://localhost:9000"])
    assert result.exit_code == 0, result.output
    assert opened == ["http://localhost:9000/dashboard#job=job-1"]


def deployed(monkeypatch, handler):
    """Points ``tandemn web`` at a deployed-looking API answered by ``handler``."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    real_client = httpx.Client
    monkeypatch.setattr(
        cli_web.httpx,
        "Client",
        lambda **kwargs: real_client(transport=httpx.MockTransport(handler), **kwargs),
    )
    return "https://abc123.execute-api.us-west-2.amazonaws.com/api"


def test_web_mints_a_signed_token_for_a_deployed_stage(monkeypatch):
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"token": "tdb_abc.def", "expires_at": 1})

    api_url = deployed(monkeypatch, handler)
    result = runner.invoke(cli_app, ["web", "--print", "--ttl", "600", "--api-url", api_url])

    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"{api_url}/dashboard?token=tdb_abc.def"
    (request,) = seen
    assert request.url.path == "/api/dashboard/token"
    assert json.loads(request.content) == {"ttl_seconds": 600}
    authorization = request.headers["Authorization"]
    assert authorization.startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "/us-west-2/execute-api/aws4_request" in authorization


def test_web_reports_a_refused_token(monkeypatch):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, json={"Message": "User is not authorized"})

    api_url = deployed(monkeypatch, handler)
    result = runner.invoke(cli_app, ["web", "--print", "--api-url", api_url])
    assert result.exit_code == 1
    assert "not authorized" in result.output


def test_signing_key_is_created_once(aws_account):
    first = dashboard._signing_key(aws_account, create=True)
    dashboard.clear_caches()
    assert dashboard._signing_key(aws_account, create=True) == first
    item = aws.client("dynamodb").get_item(
        TableName=aws_account.connections_table,
        Key={"connection_id": {"S": dashboard.KEY_CONNECTION_ID}, "topic": {"S": "key"}},
    )["Item"]
    assert "expires_at" not in dynamo.deserialize(item)
