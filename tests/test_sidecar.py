"""Sidecar behaviour against a fake control plane and a fake engine on 127.0.0.1, with S3 on moto.

S3 is a moto server on 127.0.0.1 that boto3 reaches through AWS_ENDPOINT_URL, as the sidecar
would reach any S3 endpoint. No real engine or control plane runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer

from sidecar.cli import parse_settings
from sidecar.control import (
    ControlPlaneClient,
    ControlPlaneUnavailable,
    LeaseLost,
    RequestRejected,
)
from sidecar.engine import EngineClient
from sidecar.fakes import FakeControlPlane, FakeEngine, split_into_leases
from sidecar.logs import JsonFormatter
from sidecar.records import prepare_body
from sidecar.retry import RetryPolicy
from sidecar.runner import Runner
from sidecar.storage import ChunkStorage

PROJECT_DIR = Path(__file__).resolve().parent.parent
JOB_ID = "job-test"
REPLICA_ID = "replica-a"
TOKEN = "trk_test-token-0123456789abcdef"
INPUT_BUCKET = "sidecar-input"
OUTPUT_BUCKET = "sidecar-output"
FAST_RETRY = RetryPolicy(initial_delay=0.01, max_delay=0.05, max_attempts=4, max_elapsed=5.0)
FAST_ENGINE_RETRY = RetryPolicy(initial_delay=0.01, max_delay=0.05, max_attempts=3, max_elapsed=5.0)


@pytest.fixture(scope="module")
def s3():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ACCOUNT_ID_ENDPOINT_MODE": "disabled",
            "AWS_EC2_METADATA_DISABLED": "true",
        }.items():
            patch.setenv(name, value)
        client = boto3.client("s3")
        client.create_bucket(Bucket=INPUT_BUCKET)
        client.create_bucket(Bucket=OUTPUT_BUCKET)
        yield client
    server.stop()


@pytest.fixture
def servers():
    started: list[Any] = []

    def start(server):
        started.append(server.start())
        return server

    yield start
    for server in started:
        server.stop()


def request_line(custom_id: str, max_tokens: int | None = 5, content: str | None = None, **extra):
    body: dict[str, Any] = {
        "model": "user-model",
        "messages": [{"role": "user", "content": content or custom_id}],
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    body.update(extra)
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def upload_leases(s3, key: str, lines: list[Any], chunk_size: int, **lease_options) -> list[dict]:
    """Upload JSONL lines (dicts, or raw strings written as they are) and split them into leases."""
    data = b"".join(
        (line if isinstance(line, str) else json.dumps(line)).encode() + b"\n" for line in lines
    )
    etag = s3.put_object(Bucket=INPUT_BUCKET, Key=key, Body=data)["ETag"]
    options = {"input_etag": etag, **lease_options}
    return split_into_leases(
        JOB_ID,
        data,
        chunk_size,
        input_bucket=INPUT_BUCKET,
        input_key=key,
        output_bucket=OUTPUT_BUCKET,
        **options,
    )


def read_output(s3, lease: dict) -> list[dict]:
    body = s3.get_object(Bucket=OUTPUT_BUCKET, Key=lease["output_key"])["Body"].read()
    return [json.loads(line) for line in body.splitlines()]


def output_exists(s3, lease: dict) -> bool:
    try:
        s3.head_object(Bucket=OUTPUT_BUCKET, Key=lease["output_key"])
    except ClientError:
        return False
    return True


def run_sidecar(
    control: FakeControlPlane,
    engine: FakeEngine,
    *,
    timeout: float = 20.0,
    drain_when: Any = None,
    **options: Any,
) -> tuple[int, Runner]:
    async def main() -> tuple[int, Runner]:
        control_client = ControlPlaneClient(
            control.url, JOB_ID, REPLICA_ID, TOKEN, retry=FAST_RETRY
        )
        engine_client = EngineClient(
            engine.url, concurrency=options.get("concurrency", 8), retry=FAST_ENGINE_RETRY
        )
        settings = {"poll_interval": 0.05, "health_poll_interval": 0.05, **options}
        runner = Runner(control_client, engine_client, ChunkStorage(retry=FAST_RETRY), **settings)
        watcher = asyncio.create_task(drain_once(runner, drain_when))
        try:
            code = await asyncio.wait_for(runner.run(), timeout)
        finally:
            watcher.cancel()
            await control_client.aclose()
            await engine_client.aclose()
        return code, runner

    return asyncio.run(main())


async def drain_once(runner: Runner, condition: Any) -> None:
    """Request a drain as soon as ``condition()`` is true; never when it is None."""
    if condition is None:
        return
    while not condition():
        await asyncio.sleep(0.01)
    runner.request_drain()


def new_control(leases: list[dict], **options) -> FakeControlPlane:
    return FakeControlPlane(job_id=JOB_ID, token=TOKEN, leases=leases, **options)


def served_by_content(engine: FakeEngine) -> dict[str, Any]:
    return {request.body["messages"][0]["content"]: request for request in engine.served}


def test_records_keep_custom_id_and_order(s3, servers):
    # Decreasing lengths make later requests finish first, so order must come from the input.
    lines = [request_line(f"req-{i}", max_tokens=60 - 5 * i) for i in range(10)]
    leases = upload_leases(s3, "order.jsonl", lines, chunk_size=10)
    control = servers(new_control(leases))
    engine = servers(FakeEngine(slots=8))

    code, runner = run_sidecar(control, engine, concurrency=4)

    assert code == 0
    records = read_output(s3, leases[0])
    assert [record["custom_id"] for record in records] == [f"req-{i}" for i in range(10)]
    for record in records:
        assert record["id"].startswith("batch_req_")
        assert record["error"] is None
        assert record["response"]["status_code"] == 200
        assert record["response"]["request_id"] == record["response"]["body"]["id"]
        assert record["response"]["body"]["object"] == "chat.completion"
    completion = control.completed["c000000"]
    assert completion["output_key"] == leases[0]["output_key"]
    assert completion["requests_succeeded"] == 10
    assert completion["requests_failed"] == 0
    assert control.phases == ["loading_model", "model_ready", "generating", "replica_complete"]
    assert runner.stats.chunks_completed == 1


def test_engine_400_becomes_error_record(s3, servers):
    lines = [
        request_line("short-1"),
        request_line("too-long", content="x" * 500),
        request_line("short-2"),
    ]
    leases = upload_leases(s3, "context.jsonl", lines, chunk_size=3)
    control = servers(new_control(leases))
    engine = servers(FakeEngine(context_chars=100))

    code, _ = run_sidecar(control, engine)

    assert code == 0
    records = read_output(s3, leases[0])
    assert [record["custom_id"] for record in records] == ["short-1", "too-long", "short-2"]
    failed = records[1]
    assert failed["error"]["code"] == "context_length_exceeded"
    assert "context size" in failed["error"]["message"]
    assert failed["response"]["status_code"] == 400
    assert failed["response"]["body"]["error"]["type"] == "exceed_context_size_error"
    assert records[0]["error"] is None
    assert records[2]["error"] is None
    assert control.completed["c000000"]["requests_succeeded"] == 2
    assert control.completed["c000000"]["requests_failed"] == 1
    # A 4xx from the engine is final: the request went to the engine once.
    assert sum(1 for r in engine.served if r.status == 400) == 1


def test_engine_5xx_retried_then_error_record(s3, servers):
    failures_left = {"flaky": 1}

    def respond(path, body):
        content = body["messages"][0]["content"]
        if content == "broken":
            return 500, {"error": {"message": "engine crashed"}}
        if failures_left.get(content, 0) > 0:
            failures_left[content] -= 1
            return 503, {"error": {"message": "busy"}}
        return None

    lines = [request_line("broken"), request_line("flaky"), request_line("fine")]
    leases = upload_leases(s3, "engine-5xx.jsonl", lines, chunk_size=3)
    control = servers(new_control(leases))
    engine = servers(FakeEngine(responder=respond))

    code, _ = run_sidecar(control, engine)

    assert code == 0
    records = read_output(s3, leases[0])
    broken, flaky, fine = records
    assert broken["error"]["code"] == "engine_error"
    assert broken["response"]["status_code"] == 500
    assert "engine crashed" in broken["error"]["message"]
    assert flaky["error"] is None
    assert fine["error"] is None
    attempts = [r.body["messages"][0]["content"] for r in engine.served]
    assert attempts.count("broken") == 3
    assert attempts.count("flaky") == 2


def test_engine_unreachable_request_is_error_record(s3, servers):
    lines = [request_line("lost")]
    leases = upload_leases(s3, "unreachable.jsonl", lines, chunk_size=1)
    control = servers(new_control(leases))
    engine = servers(FakeEngine())

    async def main():
        control_client = ControlPlaneClient(
            control.url, JOB_ID, REPLICA_ID, TOKEN, retry=FAST_RETRY
        )
        # Health and models come from the fake engine; completions go to a closed port.
        engine_client = EngineClient(engine.url, retry=FAST_ENGINE_RETRY)
        closed = EngineClient("http://127.0.0.1:9", retry=FAST_ENGINE_RETRY)
        engine_client.create_completion = closed.create_completion
        runner = Runner(
            control_client,
            engine_client,
            ChunkStorage(retry=FAST_RETRY),
            poll_interval=0.05,
            health_poll_interval=0.05,
        )
        try:
            return await asyncio.wait_for(runner.run(), 20)
        finally:
            for client in (control_client, engine_client, closed):
                await client.aclose()

    assert asyncio.run(main()) == 0
    (record,) = read_output(s3, leases[0])
    assert record["custom_id"] == "lost"
    assert record["error"]["code"] == "engine_unavailable"
    assert record["response"]["status_code"] is None
    assert record["response"]["body"] is None


def test_invalid_line_gets_error_record(s3, servers):
    bad_url = request_line("bad-url")
    bad_url["url"] = "/v1/embeddings"
    lines = [request_line("ok-1"), bad_url, "{not json", request_line("ok-2")]
    leases = upload_leases(s3, "invalid.jsonl", lines, chunk_size=4)
    control = servers(new_control(leases))
    engine = servers(FakeEngine())

    code, _ = run_sidecar(control, engine)

    assert code == 0
    records = read_output(s3, leases[0])
    assert [record["custom_id"] for record in records] == ["ok-1", "bad-url", None, "ok-2"]
    assert records[1]["error"]["code"] == "invalid_request"
    assert "/v1/embeddings" in records[1]["error"]["message"]
    assert records[2]["error"]["code"] == "invalid_request"
    assert len(engine.served) == 2


def test_blank_lines_are_skipped(s3, servers):
    lines = [request_line("a"), "   ", "", request_line("b")]
    leases = upload_leases(s3, "blank.jsonl", lines, chunk_size=4)
    control = servers(new_control(leases))
    engine = servers(FakeEngine())

    code, _ = run_sidecar(control, engine)

    assert code == 0
    records = read_output(s3, leases[0])
    assert [record["custom_id"] for record in records] == ["a", "b"]


def test_request_body_prepared_for_engine(s3, servers):
    lines = [
        request_line("capped", max_tokens=100, stream=True, stream_options={"include_usage": True}),
        request_line("unset", max_tokens=None),
        request_line("below-cap", max_tokens=7),
    ]
    leases = upload_leases(s3, "prepare.jsonl", lines, chunk_size=3, max_output_tokens=20)
    control = servers(new_control(leases))
    engine = servers(FakeEngine(model_id="served-by-engine"))

    code, _ = run_sidecar(control, engine)

    assert code == 0
    bodies = {content: request.body for content, request in served_by_content(engine).items()}
    assert bodies["capped"]["max_tokens"] == 20
    assert bodies["capped"]["stream"] is False
    assert "stream_options" not in bodies["capped"]
    assert bodies["capped"]["model"] == "served-by-engine"
    assert bodies["unset"]["max_tokens"] == 20
    assert bodies["below-cap"]["max_tokens"] == 7


def test_prepare_body_caps_completion_tokens():
    body = {"model": "m", "messages": [], "max_completion_tokens": 50}
    prepared = prepare_body(body, "served", 10)
    assert prepared["max_completion_tokens"] == 10
    assert "max_tokens" not in prepared
    assert body["max_completion_tokens"] == 50
    assert prepare_body(body, "served", None)["max_completion_tokens"] == 50


def test_served_model_option_skips_model_lookup(s3, servers):
    leases = upload_leases(s3, "served.jsonl", [request_line("a")], chunk_size=1)
    control = servers(new_control(leases))
    engine = servers(FakeEngine(model_id="engine-model"))

    code, _ = run_sidecar(control, engine, served_model="explicit-model")

    assert code == 0
    assert engine.served[0].body["model"] == "explicit-model"


def test_lease_lost_on_renew_stops_chunk(s3, servers):
    # One request of 3 s against a lease renewed every 0.1 s.
    leases = upload_leases(
        s3, "lost.jsonl", [request_line("slow", max_tokens=3000)], chunk_size=1, lease_seconds=0.3
    )
    control = servers(new_control(leases))
    control.lose_on_renew.add("c000000")
    engine = servers(FakeEngine())

    started = time.monotonic()
    code, runner = run_sidecar(control, engine)
    elapsed = time.monotonic() - started

    assert code == 0
    assert elapsed < 2.5, "the chunk's request was not cancelled when the lease was lost"
    assert control.calls_to("chunks/complete") == []
    assert control.released == []
    assert not output_exists(s3, leases[0])
    assert runner.stats.chunks_lost == 1
    assert control.phases[-1] == "replica_complete"


def test_renewal_keeps_long_chunk(s3, servers):
    leases = upload_leases(
        s3, "renewed.jsonl", [request_line("slow", max_tokens=500)], chunk_size=1, lease_seconds=0.3
    )
    control = servers(new_control(leases))
    engine = servers(FakeEngine())

    code, _ = run_sidecar(control, engine)

    assert code == 0
    assert len(control.calls_to("chunks/renew")) >= 2
    assert "c000000" in control.completed


def test_control_plane_503_is_retried(servers):
    control = servers(new_control([]))
    control.fail_next("phase", 503, times=2)

    async def main():
        client = ControlPlaneClient(control.url, JOB_ID, REPLICA_ID, TOKEN, retry=FAST_RETRY)
        try:
            return await client.report_phase("loading_model")
        finally:
            await client.aclose()

    answer = asyncio.run(main())
    assert answer["ok"] is True
    assert len(control.calls_to("phase")) == 3


def test_control_plane_retries_are_bounded(servers):
    control = servers(new_control([]))
    control.fail_next("chunks/progress", 500, times=10)

    async def main():
        client = ControlPlaneClient(control.url, JOB_ID, REPLICA_ID, TOKEN, retry=FAST_RETRY)
        try:
            await client.progress()
        finally:
            await client.aclose()

    with pytest.raises(ControlPlaneUnavailable) as raised:
        asyncio.run(main())
    assert raised.value.status_code == 500
    assert len(control.calls_to("chunks/progress")) == FAST_RETRY.max_attempts


def test_control_plane_400_is_not_retried(servers):
    control = servers(new_control([]))
    control.fail_next("chunks/pull", 400, {"code": "invalid_request", "message": "bad replica_id"})

    async def main():
        client = ControlPlaneClient(control.url, JOB_ID, REPLICA_ID, TOKEN, retry=FAST_RETRY)
        try:
            await client.pull()
        finally:
            await client.aclose()

    with pytest.raises(RequestRejected) as raised:
        asyncio.run(main())
    assert raised.value.status_code == 400
    assert raised.value.code == "invalid_request"
    assert raised.value.message == "bad replica_id"
    assert len(control.calls_to("chunks/pull")) == 1


def test_renew_409_raises_lease_lost(s3, servers):
    leases = upload_leases(s3, "renew409.jsonl", [request_line("a")], chunk_size=1)
    control = servers(new_control(leases))

    async def main():
        client = ControlPlaneClient(control.url, JOB_ID, REPLICA_ID, TOKEN, retry=FAST_RETRY)
        try:
            lease = await client.pull()
            stale = lease.model_copy(update={"lease_token": "stale-token-0123456789"})
            await client.renew(stale)
        finally:
            await client.aclose()

    with pytest.raises(LeaseLost) as raised:
        asyncio.run(main())
    assert raised.value.status_code == 409
    assert len(control.calls_to("chunks/renew")) == 1


def test_pull_rejected_exits_nonzero(servers):
    control = servers(new_control([]))
    control.fail_next("chunks/pull", 403, {"code": "forbidden", "message": "replica was killed"})
    engine = servers(FakeEngine())

    code, _ = run_sidecar(control, engine)

    assert code == 1
    assert "replica_complete" not in control.phases


def test_drain_releases_unfinished_leases(s3, servers):
    # Concurrency 1: chunk 0's 5 s request occupies the slot, and chunk 1 (pulled once chunk 0 is
    # dispatched) waits for it. Neither can finish within the 0.3 s drain.
    lines = [request_line("long-0", max_tokens=5000), request_line("long-1", max_tokens=5000)]
    leases = upload_leases(s3, "drain.jsonl", lines, chunk_size=1)
    control = servers(new_control(leases))
    engine = servers(FakeEngine())

    started = time.monotonic()
    code, runner = run_sidecar(
        control,
        engine,
        concurrency=1,
        drain_seconds=0.3,
        drain_when=lambda: len(control.calls_to("chunks/pull")) >= 2 and engine.slots_taken >= 1,
    )
    elapsed = time.monotonic() - started

    assert code == 0
    assert elapsed < 3.0
    released = {body["chunk_id"]: body for body in control.released}
    assert set(released) == {"c000000", "c000001"}
    assert {body["reason"] for body in released.values()} == {"drain"}
    assert control.calls_to("chunks/complete") == []
    assert "draining" in control.phases
    assert "replica_complete" not in control.phases
    assert runner.stats.chunks_released == 2


def test_drain_lets_held_chunk_finish(s3, servers):
    lines = [request_line(f"r-{i}", max_tokens=300) for i in range(2)]
    leases = upload_leases(s3, "drain-finish.jsonl", lines, chunk_size=2)
    control = servers(new_control(leases))
    engine = servers(FakeEngine())

    # With one slot, the chunk's second request is still waiting when the drain starts, so no
    # second pull was due before it.
    code, _ = run_sidecar(
        control,
        engine,
        concurrency=1,
        drain_seconds=5.0,
        drain_when=lambda: engine.slots_taken >= 1,
    )

    assert code == 0
    assert "c000000" in control.completed
    assert control.released == []
    assert control.phases[-1] == "draining"
    assert len(control.calls_to("chunks/pull")) == 1


def test_sigterm_drains_sidecar_process(s3, servers):
    lines = [request_line("long", max_tokens=10_000)]
    leases = upload_leases(s3, "sigterm.jsonl", lines, chunk_size=1)
    control = servers(new_control(leases))
    engine = servers(FakeEngine())
    environment = {
        **os.environ,
        "TANDEMN_REPLICA_TOKEN": TOKEN,
        "TANDEMN_API_URL": control.url,
        "PYTHONPATH": str(PROJECT_DIR),
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sidecar",
            "--job-id",
            JOB_ID,
            "--replica-id",
            REPLICA_ID,
            "--engine-url",
            engine.url,
            "--drain-seconds",
            "0.2",
        ],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=PROJECT_DIR,
    )
    try:
        deadline = time.monotonic() + 15
        while engine.slots_taken < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 0, stderr.decode()
    assert [body["reason"] for body in control.released] == ["drain"]
    assert "draining" in control.phases
    log_text = stderr.decode()
    assert TOKEN not in log_text
    entries = [json.loads(line) for line in log_text.splitlines() if line.strip()]
    assert any(entry["message"] == "drain requested" for entry in entries)
    released = [entry for entry in entries if entry["message"] == "lease released"]
    assert released[0]["chunk_id"] == "c000000"
    assert released[0]["job_id"] == JOB_ID
    assert released[0]["replica_id"] == REPLICA_ID


def pipelining_leases(s3, key: str) -> list[dict]:
    # Chunk 0 ends with a long request; chunk 1 has short ones.
    lines = [
        request_line("a-short", max_tokens=50),
        request_line("a-long", max_tokens=800),
        request_line("b-0", max_tokens=50),
        request_line("b-1", max_tokens=50),
    ]
    return upload_leases(s3, key, lines, chunk_size=2)


def test_next_chunk_starts_before_tail_ends(s3, servers):
    leases = pipelining_leases(s3, "pipelined.jsonl")
    control = servers(new_control(leases))
    engine = servers(FakeEngine(slots=4))

    code, _ = run_sidecar(control, engine, concurrency=2, pipeline=True)

    assert code == 0
    served = served_by_content(engine)
    assert served["b-0"].slot_start < served["a-long"].slot_end
    assert served["b-1"].slot_start < served["a-long"].slot_end
    assert set(control.completed) == {"c000000", "c000001"}


def test_without_pipeline_next_chunk_waits(s3, servers):
    leases = pipelining_leases(s3, "finish-then-pull.jsonl")
    control = servers(new_control(leases))
    engine = servers(FakeEngine(slots=4))

    code, _ = run_sidecar(control, engine, concurrency=2, pipeline=False)

    assert code == 0
    served = served_by_content(engine)
    assert served["b-0"].slot_start >= served["a-long"].slot_end
    assert served["b-1"].slot_start >= served["a-long"].slot_end
    # The second pull comes only after chunk 0 was completed.
    assert control.call_times["chunks/pull"][1] > control.call_times["chunks/complete"][0]


def test_slots_shared_across_chunks(s3, servers):
    lines = [request_line(f"r-{i}", max_tokens=100) for i in range(12)]
    leases = upload_leases(s3, "shared-slots.jsonl", lines, chunk_size=3)
    control = servers(new_control(leases))
    engine = servers(FakeEngine(slots=16))

    code, _ = run_sidecar(control, engine, concurrency=4)

    assert code == 0
    intervals = engine.busy_intervals()
    peak = max(sum(1 for s, e in intervals if s <= start < e) for start, _ in intervals)
    assert peak <= 4
    assert len(control.completed) == 4


def test_all_done_reports_replica_complete(servers):
    control = servers(new_control([]))
    engine = servers(FakeEngine())

    code, _ = run_sidecar(control, engine)

    assert code == 0
    assert control.phases == ["loading_model", "model_ready", "replica_complete"]
    assert len(control.calls_to("chunks/pull")) == 1
    assert len(control.calls_to("chunks/progress")) == 1


def test_not_done_keeps_polling(servers):
    control = servers(new_control([]))
    not_done = {
        "total": 3,
        "pending": 0,
        "inflight": 1,
        "completed": 2,
        "failed": 0,
        "all_done": False,
    }
    control.fail_next("chunks/progress", 200, not_done, times=2)
    engine = servers(FakeEngine())

    code, _ = run_sidecar(control, engine, poll_interval=0.05)

    assert code == 0
    assert len(control.calls_to("chunks/progress")) == 3
    assert len(control.calls_to("chunks/pull")) == 3
    assert control.phases[-1] == "replica_complete"


def test_startup_failed_when_engine_never_ready(servers):
    control = servers(new_control([]))
    engine = servers(FakeEngine())
    engine.health_status = 503

    code, _ = run_sidecar(control, engine, engine_ready_timeout=0.3)

    assert code == 1
    assert control.phases == ["loading_model", "startup_failed"]
    reason = control.calls_to("phase")[-1]["reason"]
    assert "HTTP 503" in reason
    assert control.calls_to("chunks/pull") == []


def test_startup_failed_when_engine_unreachable(servers):
    control = servers(new_control([]))

    async def main():
        control_client = ControlPlaneClient(
            control.url, JOB_ID, REPLICA_ID, TOKEN, retry=FAST_RETRY
        )
        engine_client = EngineClient("http://127.0.0.1:9")
        runner = Runner(
            control_client,
            engine_client,
            ChunkStorage(),
            engine_ready_timeout=0.3,
            health_poll_interval=0.05,
        )
        try:
            return await runner.run()
        finally:
            await control_client.aclose()
            await engine_client.aclose()

    assert asyncio.run(main()) == 1
    assert control.phases == ["loading_model", "startup_failed"]
    assert "ConnectError" in control.calls_to("phase")[-1]["reason"]


def test_input_read_failure_releases_with_error(s3, servers):
    leases = upload_leases(
        s3, "etag.jsonl", [request_line("a")], chunk_size=1, input_etag='"0123456789abcdef"'
    )
    control = servers(new_control(leases))
    engine = servers(FakeEngine())

    code, _ = run_sidecar(control, engine)

    assert code == 0
    (release,) = control.released
    assert release["reason"] == "error"
    assert "PreconditionFailed" in release["error"]
    assert control.calls_to("chunks/complete") == []
    assert engine.served == []


def test_output_write_failure_releases_with_error(s3, servers):
    leases = upload_leases(s3, "no-output-bucket.jsonl", [request_line("a")], chunk_size=1)
    leases[0]["output_bucket"] = "sidecar-missing-bucket"
    control = servers(new_control(leases))
    engine = servers(FakeEngine())

    code, runner = run_sidecar(control, engine)

    assert code == 0
    (release,) = control.released
    assert release["reason"] == "error"
    assert "NoSuchBucket" in release["error"]
    assert control.calls_to("chunks/complete") == []
    assert runner.stats.chunks_released == 1


def test_cli_reads_token_from_environment_only():
    environment = {
        "TANDEMN_API_URL": "http://127.0.0.1:1",
        "TANDEMN_JOB_ID": JOB_ID,
        "TANDEMN_REPLICA_ID": REPLICA_ID,
        "TANDEMN_ENGINE_URL": "http://127.0.0.1:2",
        "TANDEMN_CONCURRENCY": "3",
    }
    with pytest.raises(SystemExit):
        parse_settings([], environment)
    with pytest.raises(SystemExit):
        parse_settings(["--token", TOKEN], {**environment, "TANDEMN_REPLICA_TOKEN": TOKEN})
    settings = parse_settings(
        ["--concurrency", "5"], {**environment, "TANDEMN_REPLICA_TOKEN": TOKEN}
    )
    assert settings.token == TOKEN
    assert settings.concurrency == 5
    assert settings.drain_seconds == 90
    assert settings.engine_ready_timeout == 1200
    assert settings.served_model is None
    assert parse_settings([], {**environment, "TANDEMN_REPLICA_TOKEN": TOKEN}).concurrency == 3


def test_cli_requires_api_url():
    with pytest.raises(SystemExit):
        parse_settings(
            ["--job-id", JOB_ID, "--replica-id", REPLICA_ID, "--engine-url", "http://127.0.0.1:2"],
            {"TANDEMN_REPLICA_TOKEN": TOKEN},
        )


def test_json_formatter_puts_ids_at_top_level():
    record = logging.LogRecord("sidecar", logging.INFO, __file__, 1, "chunk %s", ("done",), None)
    record.job_id = JOB_ID
    record.chunk_id = "c000001"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "chunk done"
    assert entry["job_id"] == JOB_ID
    assert entry["chunk_id"] == "c000001"
    assert entry["level"] == "INFO"
