"""The sidecar's heartbeat, spot notice poller and token read from Parameter Store."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading

import boto3
import pytest
from moto import mock_aws

from sidecar.cli import parse_settings
from sidecar.control import ControlPlaneUnavailable
from sidecar.lifeline import Heartbeat, SpotNoticePoller


class FakeMetadata:
    """Instance metadata service on 127.0.0.1: IMDSv2 tokens and a spot notice after N polls."""

    def __init__(self, notice_after: int) -> None:
        self.polls = 0
        self.token_requests = 0
        self.tokens_seen: list[str | None] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                fake.token_requests += 1
                assert self.headers["X-aws-ec2-metadata-token-ttl-seconds"] == "21600"
                self._answer(200, b"imds-token-1")

            def do_GET(self) -> None:
                fake.tokens_seen.append(self.headers.get("X-aws-ec2-metadata-token"))
                if self.path != "/latest/meta-data/spot/instance-action":
                    self._answer(404, b"")
                    return
                fake.polls += 1
                if fake.polls <= notice_after:
                    self._answer(404, b"Not Found")
                    return
                body = {"action": "terminate", "time": "2026-12-04T12:00:00Z"}
                self._answer(200, json.dumps(body).encode())

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def metadata():
    fake = FakeMetadata(notice_after=2)
    yield fake
    fake.close()


def test_spot_notice_drains_after_404s(metadata):
    reasons: list[str] = []
    poller = SpotNoticePoller(
        f"{metadata.url}/latest/meta-data/spot/instance-action",
        reasons.append,
        token_url=f"{metadata.url}/latest/api/token",
        interval=0.01,
    )

    async def run() -> None:
        try:
            await asyncio.wait_for(poller.run(), timeout=10)
        finally:
            await poller.aclose()

    asyncio.run(run())
    assert metadata.polls == 3
    assert reasons == ["spot interruption notice: terminate at 2026-12-04T12:00:00Z"]
    assert poller.notice == {"action": "terminate", "time": "2026-12-04T12:00:00Z"}
    assert metadata.token_requests == 1
    assert set(metadata.tokens_seen) == {"imds-token-1"}


def test_spot_notice_poller_is_off_by_default(monkeypatch):
    settings = parse_settings(
        [
            "--api-url",
            "http://127.0.0.1:1",
            "--job-id",
            "job-a",
            "--replica-id",
            "job-a-r0",
            "--engine-url",
            "http://127.0.0.1:2",
        ],
        {"TANDEMN_REPLICA_TOKEN": "trk_job-a-r0.secret"},
    )
    assert settings.spot_notice_url is None
    assert settings.metadata_token_url is None
    assert settings.heartbeat_interval == 20.0


class FakeControl:
    job_id = "job-a"
    replica_id = "job-a-r0"

    def __init__(self, answers: list) -> None:
        self.answers = answers
        self.calls = 0

    async def heartbeat(self) -> dict:
        self.calls += 1
        answer = self.answers[min(self.calls, len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_heartbeat_drains_once_when_asked():
    control = FakeControl(
        [
            ControlPlaneUnavailable("connection refused", None, 2),
            {"phase": "running", "action": "continue"},
            {"phase": "draining", "action": "drain"},
        ]
    )
    reasons: list[str] = []
    heartbeat = Heartbeat(control, reasons.append, interval=0.01)

    async def run() -> None:
        task = asyncio.create_task(heartbeat.run())
        while control.calls < 6:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    assert reasons == ["control plane reports phase draining"]


def test_token_read_from_secure_parameter(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        ssm = boto3.client("ssm", region_name="us-west-2")
        name = "/tandemn/replica-tokens/job-a/job-a-r0"
        ssm.put_parameter(Name=name, Value="trk_job-a-r0.from-ssm", Type="SecureString")
        settings = parse_settings(
            [
                "--api-url",
                "http://127.0.0.1:1",
                "--job-id",
                "job-a",
                "--replica-id",
                "job-a-r0",
                "--engine-url",
                "http://127.0.0.1:2",
            ],
            {
                "TANDEMN_REPLICA_TOKEN_PARAMETER": name,
                "TANDEMN_REPLICA_TOKEN_REGION": "us-west-2",
            },
        )
    assert settings.token == "trk_job-a-r0.from-ssm"
