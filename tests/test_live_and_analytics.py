"""Live updates (server-sent events, WebSocket pushes), events, cost, run reports, EMF metrics."""

from __future__ import annotations

import json
import time

import boto3
import pytest
from botocore.stub import ANY, Stubber
from chalice.test import Client

from chalicelib import aws, cost
from tests import support
from tests.conftest import PROJECT_DIR
from tests.test_metrics import ReplicaFeed, page

API_ID = "wstest"
STAGE = "api"


@pytest.fixture
def job_and_replica(client, aws_account):
    job = support.submit_job(client, aws_account, num_requests=2, chunk_size=1)
    ((replica_id, token),) = support.add_replicas(client, job["job_id"], 1).items()
    return job["job_id"], ReplicaFeed(client, job["job_id"], replica_id, token)


def ingest_pair(feed: ReplicaFeed, start: float) -> None:
    before = feed.snapshot(page("vllm_v0_before"), start)
    after = feed.snapshot(page("vllm_v0_after"), start + 10)
    response = feed.send(before, after)
    assert response.status_code == 200, response.body


def test_metrics_stream_answers_event_stream(job_and_replica):
    job_id, feed = job_and_replica
    ingest_pair(feed, time.time() - 11)
    response = feed.client.http.get(f"/job/{job_id}/metrics/stream")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    text = response.body.decode()
    assert text.startswith("retry: 2000\n")
    blocks = [block for block in text.split("\n\n") if block.strip()]
    metrics_block = next(b for b in blocks if "event: metrics" in b)
    data = next(line for line in metrics_block.splitlines() if line.startswith("data: "))
    snapshot = json.loads(data[len("data: ") :])
    assert snapshot["job_id"] == job_id
    assert snapshot["generation_tokens_total"] == 4000
    assert "event: status" in text
    assert "event: end" not in text


def test_metrics_stream_before_any_metrics(job_and_replica):
    job_id, feed = job_and_replica
    text = feed.client.http.get(f"/job/{job_id}/metrics/stream").body.decode()
    assert "event: metrics" not in text
    assert '"job_status": "queued"' in text


# WebSocket API. Chalice's local server serves no WebSockets and moto has no GoneException, so
# the handlers are invoked with hand-built events and API Gateway's management API is stubbed.


def ws_event(route: str, connection_id: str, **extra):
    kinds = {"$connect": "CONNECT", "$disconnect": "DISCONNECT", "$default": "MESSAGE"}
    event = {
        "requestContext": {
            "routeKey": route,
            "eventType": kinds[route],
            "connectionId": connection_id,
            "apiId": API_ID,
            "stage": STAGE,
            "domainName": "127.0.0.1",
        },
        "isBase64Encoded": False,
    }
    event.update(extra)
    return event


def stream_event(job_id: str, replica_id: str):
    return {
        "Records": [
            {
                "eventID": "1",
                "eventName": "MODIFY",
                "eventSource": "aws:dynamodb",
                "awsRegion": "us-east-1",
                "eventSourceARN": "arn:aws:dynamodb:us-east-1:123456789012:table/"
                "tandemn-metrics/stream/2024-01-01T00:00:00.000",
                "dynamodb": {
                    "ApproximateCreationDateTime": time.time(),
                    "Keys": {
                        "job_id": {"S": job_id},
                        "metric_key": {"S": f"state#{replica_id}"},
                    },
                    "SequenceNumber": "100",
                    "SizeBytes": 60,
                    "StreamViewType": "KEYS_ONLY",
                },
            },
            {
                "eventID": "2",
                "eventName": "INSERT",
                "eventSource": "aws:dynamodb",
                "awsRegion": "us-east-1",
                "eventSourceARN": "arn:aws:dynamodb:us-east-1:123456789012:table/"
                "tandemn-metrics/stream/2024-01-01T00:00:00.000",
                "dynamodb": {
                    "ApproximateCreationDateTime": time.time(),
                    "Keys": {
                        "job_id": {"S": job_id},
                        "metric_key": {"S": f"ts#0000000001.000000#{replica_id}#0000000001"},
                    },
                    "SequenceNumber": "101",
                    "SizeBytes": 60,
                    "StreamViewType": "KEYS_ONLY",
                },
            },
        ]
    }


@pytest.fixture
def websocket_app(aws_account):
    from app import app

    api = app.websocket_api
    saved = (api.session, api._endpoint, api._client)
    api.session = boto3.Session(region_name="us-east-1")
    # A local endpoint: the stubbed client sends nothing, and nothing would leave the machine.
    api._endpoint, api._client = None, None
    api.configure("127.0.0.1:9", STAGE)
    with (
        Client(app, stage_name="test", project_dir=str(PROJECT_DIR)) as test_client,
        Stubber(api._get_client()) as stubber,
    ):
        yield test_client, stubber
    api.session, api._endpoint, api._client = saved


def connection_items(connection_id: str) -> list[dict]:
    return aws.client("dynamodb").query(
        TableName="tandemn-connections",
        KeyConditionExpression="connection_id = :c",
        ExpressionAttributeValues={":c": {"S": connection_id}},
    )["Items"]


def connect(test_client, connection_id: str) -> dict:
    token = support.post(test_client, "/ws/token").json_body["token"]
    event = ws_event("$connect", connection_id, queryStringParameters={"token": token})
    return test_client.lambda_.invoke("websocket_connect", event).payload


def test_websocket_connect_requires_fresh_token(websocket_app):
    test_client, _ = websocket_app
    assert connect(test_client, "conn-ok")["statusCode"] == 200
    missing = test_client.lambda_.invoke("websocket_connect", ws_event("$connect", "c-none"))
    assert missing.payload["statusCode"] == 401
    token = support.post(test_client, "/ws/token").json_body["token"]
    first = ws_event("$connect", "c-1", queryStringParameters={"token": token})
    second = ws_event("$connect", "c-2", queryStringParameters={"token": token})
    assert test_client.lambda_.invoke("websocket_connect", first).payload["statusCode"] == 200
    # A token is single-use.
    assert test_client.lambda_.invoke("websocket_connect", second).payload["statusCode"] == 401


def test_websocket_pushes_to_subscribers_and_drops_gone(websocket_app, aws_account):
    test_client, stubber = websocket_app
    job = support.submit_job(test_client, aws_account, num_requests=2, chunk_size=1)
    job_id = job["job_id"]
    ((replica_id, token),) = support.add_replicas(test_client, job_id, 1).items()
    feed = ReplicaFeed(test_client, job_id, replica_id, token)
    for connection_id in ("conn-a", "conn-b"):
        assert connect(test_client, connection_id)["statusCode"] == 200
        message = ws_event(
            "$default",
            connection_id,
            body=json.dumps({"action": "subscribe", "job_id": job_id}),
        )
        test_client.lambda_.invoke("websocket_message", message)

    ingest_pair(feed, time.time() - 11)
    for connection_id in ("conn-a", "conn-b"):
        stubber.add_response("post_to_connection", {}, {"ConnectionId": connection_id, "Data": ANY})
    result = test_client.lambda_.invoke("push_metrics", stream_event(job_id, replica_id))
    assert result.payload == {"sent": 2, "gone": 0}
    stubber.assert_no_pending_responses()

    # conn-b's client went away: API Gateway answers GoneException and its items are deleted.
    stubber.add_response("post_to_connection", {}, {"ConnectionId": "conn-a", "Data": ANY})
    stubber.add_client_error(
        "post_to_connection",
        service_error_code="GoneException",
        http_status_code=410,
        expected_params={"ConnectionId": "conn-b", "Data": ANY},
    )
    result = test_client.lambda_.invoke("push_metrics", stream_event(job_id, replica_id))
    assert result.payload == {"sent": 1, "gone": 1}
    assert connection_items("conn-b") == []
    assert len(connection_items("conn-a")) == 2


def test_websocket_pushed_message_carries_snapshot(websocket_app, aws_account):
    test_client, stubber = websocket_app
    job = support.submit_job(test_client, aws_account, num_requests=2, chunk_size=1)
    job_id = job["job_id"]
    ((replica_id, token),) = support.add_replicas(test_client, job_id, 1).items()
    ingest_pair(ReplicaFeed(test_client, job_id, replica_id, token), time.time() - 11)
    connect(test_client, "conn-s")
    sent: list[bytes] = []
    stubber.add_response("post_to_connection", {}, {"ConnectionId": "conn-s", "Data": ANY})
    client = stubber.client
    client.meta.events.register(
        "before-parameter-build.apigatewaymanagementapi.PostToConnection",
        lambda params, **kwargs: sent.append(params["Data"]),
    )
    # A subscription sends the current snapshot at once.
    message = ws_event(
        "$default", "conn-s", body=json.dumps({"action": "subscribe", "job_id": job_id})
    )
    test_client.lambda_.invoke("websocket_message", message)
    payload = json.loads(sent[0])
    assert payload["type"] == "metrics"
    assert payload["snapshot"]["generation_tokens_total"] == 4000


def test_websocket_disconnect_removes_items(websocket_app, aws_account):
    test_client, _ = websocket_app
    connect(test_client, "conn-d")
    message = ws_event(
        "$default", "conn-d", body=json.dumps({"action": "subscribe", "job_id": "job-x"})
    )
    test_client.lambda_.invoke("websocket_message", message)
    assert len(connection_items("conn-d")) == 2
    test_client.lambda_.invoke("websocket_disconnect", ws_event("$disconnect", "conn-d"))
    assert connection_items("conn-d") == []


# Events, cost, run reports.


def run_job_to_the_end(client, settings, job_id: str, replica_id: str, token: str) -> None:
    while True:
        response = support.pull(client, job_id, replica_id, token)
        if response.status_code == 204:
            return
        lease = response.json_body
        support.write_output(settings, lease)
        assert support.complete(client, job_id, replica_id, token, lease).status_code == 200


def test_events_record_transitions_and_reclaims(job_and_replica, aws_account):
    job_id, feed = job_and_replica
    client = feed.client
    lease = support.pull(client, job_id, feed.replica_id, feed.token).json_body
    assert lease["chunk_id"]
    killed = support.post(client, f"/job/{job_id}/kill", {"replica_ids": [feed.replica_id]})
    assert killed.status_code == 200, killed.body
    body = support.get(client, f"/job/{job_id}/events").json_body
    kinds = [event["kind"] for event in body["events"]]
    assert "reclaim" in kinds
    phases = [e["phase"] for e in body["events"] if e["kind"] == "replica_phase"]
    assert phases[-1] == "killed"
    timestamps = [event["timestamp"] for event in body["events"]]
    assert timestamps == sorted(timestamps)
    page_one = support.get(client, f"/job/{job_id}/events?limit=1").json_body
    assert page_one["count"] == 1
    assert "next_token" in page_one


def test_job_view_has_cost(job_and_replica, aws_account, monkeypatch, tmp_path):
    job_id, feed = job_and_replica
    catalog = tmp_path / "instances.json"
    catalog.write_text(
        json.dumps(
            {"instances": [{"instance_type": "g6e.xlarge", "on_demand_usd_per_hour": 1.861}]}
        )
    )
    monkeypatch.setattr(cost, "CATALOG_PATH", catalog)
    cost._catalog.cache_clear()
    try:
        aws.client("dynamodb").update_item(
            TableName=aws_account.replicas_table,
            Key={"job_id": {"S": job_id}, "replica_id": {"S": feed.replica_id}},
            UpdateExpression="SET instance_type = :t, created_at = :c",
            ExpressionAttributeValues={
                ":t": {"S": "g6e.xlarge"},
                ":c": {"N": str(time.time() - 3600)},
            },
        )
        ingest_pair(feed, time.time() - 11)
        view = support.get(feed.client, f"/job/{job_id}").json_body
    finally:
        cost._catalog.cache_clear()
    job_cost = view["cost"]
    assert job_cost["price_known"] is True
    assert job_cost["accrued_usd"] == pytest.approx(1.861, abs=0.01)
    assert job_cost["num_running_replicas"] == 1
    assert job_cost["sustained_generation_toks_per_s"] == 400.0
    # No request has finished and no avg_output_tokens was given, so there is no ETA yet.
    assert job_cost["eta_sec"] is None


def test_cost_eta_from_throughput_and_remaining_tokens():
    job = {
        "job_id": "j",
        "status": "generating",
        "num_requests": 100,
        "live_requests_succeeded": 20,
        "generation_tokens_total": 4000,
    }
    now = 10_000.0
    replicas = [
        {"replica_id": "a", "phase": "running", "created_at": now - 1800, "provider": "local"},
        {
            "replica_id": "b",
            "phase": "killed",
            "created_at": now - 3600,
            "updated_at": now - 1800,
            "provider": "local",
        },
    ]
    result = cost.job_cost(job, replicas, 200.0, now)
    # 80 requests left at 4000 / 20 = 200 tokens each, 16000 tokens at 200 tok/s.
    assert result["remaining_output_tokens_estimate"] == 16000
    assert result["eta_sec"] == 80
    assert result["accrued_usd"] == 0.0
    assert result["projected_total_usd"] == 0.0
    assert [r["running_seconds"] for r in result["replicas"]] == [1800.0, 1800.0]


def test_unknown_price_leaves_cost_unknown():
    job = {"job_id": "j", "status": "generating", "num_requests": 10}
    replicas = [
        {
            "replica_id": "a",
            "phase": "running",
            "created_at": 0.0,
            "provider": "aws",
            "instance_type": "x9.none",
        }
    ]
    result = cost.job_cost(job, replicas, None, 3600.0)
    assert result["price_known"] is False
    assert result["replicas"][0]["accrued_usd"] is None
    assert result["projected_total_usd"] is None


def test_assembly_writes_run_report(job_and_replica, aws_account):
    job_id, feed = job_and_replica
    client = feed.client
    ingest_pair(feed, time.time() - 11)
    run_job_to_the_end(client, aws_account, job_id, feed.replica_id, feed.token)
    assert support.get(client, f"/job/{job_id}").json_body["status"] == "succeeded"
    run = support.get(client, f"/analytics/runs/{job_id}").json_body["run"]
    assert run["model_name"] == "org/Tiny-1B"
    assert run["requests"] == {"total": 2, "succeeded": 2, "failed": 0, "cancelled": 0}
    assert run["tokens"]["generation"] == 4000
    assert run["tokens"]["source"] == "engine"
    assert run["latency"]["ttft_ms_p50"] is not None
    assert run["num_replicas"] == 1
    # The teardown stops the replica before it writes the report.
    assert run["replicas"][0]["phase"] == "completed"
    assert run["runtime"]["generation_time_sec"] > 0
    report = aws.client("s3").get_object(
        Bucket=aws_account.bucket, Key=f"jobs/{job_id}/report.json"
    )
    assert json.loads(report["Body"].read())["run_id"] == job_id
    listing = support.get(client, "/analytics/runs?model=tiny").json_body
    assert [r["run_id"] for r in listing["runs"]] == [job_id]
    assert support.get(client, "/analytics/runs?model=llama").json_body["count"] == 0
    assert support.get(client, f"/analytics/runs/{job_id}-x").status_code == 404

    # A summary that arrives after assembly is added to the stored report.
    support.post(
        client,
        f"/job/{job_id}/metrics/summary",
        {"replica_id": feed.replica_id, "metrics": {"total_output_tokens": 4000}},
        feed.token,
    )
    run = support.get(client, f"/analytics/runs/{job_id}").json_body["run"]
    assert run["replicas"][0]["summary"]["total_output_tokens"] == 4000


def test_run_report_counts_delivered_tokens(job_and_replica, aws_account):
    job_id, feed = job_and_replica
    client = feed.client
    ingest_pair(feed, time.time() - 11)
    while (pulled := support.pull(client, job_id, feed.replica_id, feed.token)).status_code == 200:
        lease = pulled.json_body
        custom_id = support.read_range(lease)[0]["custom_id"]
        body = {"choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 7}}
        record = {"custom_id": custom_id, "response": {"status_code": 200, "body": body}}
        support.write_output(aws_account, lease, [record])
        completed = support.complete(client, job_id, feed.replica_id, feed.token, lease)
        assert completed.status_code == 200
    run = support.get(client, f"/analytics/runs/{job_id}").json_body["run"]
    # Two requests of 30 + 7 tokens each, summed from output.jsonl by assembly.
    assert run["tokens"] == {"prompt": 60, "generation": 14, "total": 74, "source": "output records"}
    # The engines' own counters stay visible, apart from what was delivered.
    assert run["engine_tokens"]["generation"] == 4000


def test_assembly_usage_skips_malformed_records():
    from chalicelib.assembly import _Counts

    counts = _Counts()
    odd_records = [
        {"response": "not an object"},
        {"response": {"body": [1, 2]}},
        {"response": {"body": {"usage": "many"}}},
        {"response": {"body": {"usage": {"prompt_tokens": -5, "completion_tokens": True}}}},
        {"response": {"body": {"usage": {"prompt_tokens": 1.5, "completion_tokens": "7"}}}},
        {},
    ]
    for record in odd_records:
        counts.add_usage(record)
    counts.add_usage({"response": {"body": {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}}})
    assert counts.prompt_tokens == 3
    assert counts.generation_tokens == 4


def test_run_timeseries_per_replica_and_aggregated(job_and_replica, aws_account):
    job_id, feed = job_and_replica
    client = feed.client
    start = time.time() - 11
    ingest_pair(feed, start)
    run_job_to_the_end(client, aws_account, job_id, feed.replica_id, feed.token)
    body = support.get(client, f"/analytics/runs/{job_id}/timeseries?step=5").json_body
    assert body["count"] == 2
    assert [row["replica_id"] for row in body["timeseries"]] == [feed.replica_id] * 2
    assert body["aggregated"][-1]["generation_tokens_total"] == 4000
    assert all(row["replica_id"] is None for row in body["aggregated"])
    windowed = support.get(
        client, f"/analytics/runs/{job_id}/timeseries?start={start + 5}&end={start + 20}"
    ).json_body
    assert windowed["count"] == 1


def test_run_listing_pages(client, aws_account):
    from chalicelib import analytics, dynamo

    for index in range(3):
        row = {
            "run_id": f"run-{index}",
            "listing": "run",
            "created_at": 1000.0 + index,
            "model_name": "org/M",
            "model_search": "org/m",
            "gpu_search": "l40s",
            "report": {
                "run_id": f"run-{index}",
                "job_id": f"run-{index}",
                "model_name": "org/M",
                "status": "succeeded",
                "runtime": {
                    "created_at": 1000.0 + index,
                    "finished_at": 2000.0,
                    "total_runtime_sec": 1.0,
                },
                "num_replicas": 1,
                "gpu_types": ["L40S"],
                "instance_types": [],
                "requests": {"succeeded": 1, "failed": 0},
                "tokens": {"prompt": 1, "generation": 1},
                "throughput": {"output_tokens_per_sec": 1.0},
                "cost_usd": 0.0,
                "cost_per_million_tokens": 0.0,
            },
        }
        aws.client("dynamodb").put_item(
            TableName=aws_account.runs_table, Item=dynamo.serialize(row)
        )
    first = analytics.list_runs(aws_account, model=None, gpu="L40S", limit=2, next_token=None)
    assert [r["run_id"] for r in first["runs"]] == ["run-2", "run-1"]
    second = analytics.list_runs(
        aws_account, model=None, gpu="l40s", limit=2, next_token=first["next_token"]
    )
    assert [r["run_id"] for r in second["runs"]] == ["run-0"]
    assert "next_token" not in second


def test_handlers_flush_emf_metrics(client, aws_account, monkeypatch, capsys):
    # The test stage sets POWERTOOLS_METRICS_DISABLED during each call; turn the flush back on.
    monkeypatch.setattr("chalicelib.observability.is_metrics_disabled", lambda: False)
    monkeypatch.setattr(
        "aws_lambda_powertools.metrics.provider.cloudwatch_emf.cloudwatch.is_metrics_disabled",
        lambda: False,
    )
    support.submit_job(client, aws_account, num_requests=2, chunk_size=1)
    lines = [line for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    assert lines, "no EMF line was printed"
    document = json.loads(lines[-1])
    assert document["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "Tandemn"
    assert document["JobsSubmitted"] == [1.0]


def test_launch_attempts_become_events(aws_account):
    from chalicelib import events

    events.launch_attempt_recorded(
        aws_account,
        "job-l",
        "job-l-r0",
        {
            "attempt": 1,
            "outcome": "no_capacity",
            "instance_type": "g6e.xlarge",
            "reason": "InsufficientInstanceCapacity: none left",
        },
    )
    events.launch_attempt_recorded(
        aws_account,
        "job-l",
        "job-l-r0",
        {"attempt": 2, "outcome": "launched", "instance_type": "g6e.2xlarge", "instance_id": "i-1"},
    )
    listed = events.list_events(aws_account, "job-l", limit=10)["events"]
    assert [e["kind"] for e in listed] == ["launch_failed", "launch_attempt"]
    assert listed[0]["level"] == "error"
    assert listed[0]["placement"] == {"instance_type": "g6e.xlarge"}
    assert "InsufficientInstanceCapacity" in listed[0]["reason"]
    assert listed[1]["instance_id"] == "i-1"
