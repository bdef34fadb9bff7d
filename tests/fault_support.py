"""Fault injection for the local stack, and the invariant checker that every fault test ends with.

- ``Cluster``: a moto server process plus an API process (Chalice's local server and the
  watchdog) that a test can SIGKILL and start again on the same port. All state lives in the moto
  server, as it lives in DynamoDB and S3 in a deployment. Replicas are ``external``: the test
  starts each one as a real sidecar process beside a simulated engine (``ReplicaProcess``).
- ``BotocoreFaults``: a botocore ``before-send`` hook that returns a throttling error or an HTTP
  500 for a seeded fraction of the API process's DynamoDB and S3 requests before they reach moto.
  botocore's retries, then the app and then the sidecar must recover from them.
- ``FakeMetadataServer``: the instance metadata service's IMDSv2 token and
  ``spot/instance-action`` paths on 127.0.0.1, for spot interruption notices.
- ``check_job_invariants``: every ``custom_id`` exactly once across ``output.jsonl`` and
  ``errors.jsonl``, the job's counters equal to the chunk items, no chunk both completed and queued.

Run the API process alone: ``python -m tests.fault_support api --port P --moto-url URL``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import boto3
import httpx

from tandemn.api_client import ApiError
from tandemn.local_provider import free_port
from tandemn.stack import _stage_environment, _wait_for_port
from tandemn.stack_process import PROJECT_DIR

logger = logging.getLogger("tests.fault_support")

ARTIFACTS = PROJECT_DIR / "test-artifacts" / "faults"
TERMINAL = ("succeeded", "completed_with_errors", "failed", "cancelled")


def local_environment(moto_url: str, **overrides: str) -> dict[str, str]:
    """Returns this process's environment with the ``local`` stage's variables, AWS at moto_url."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TANDEMN_"))}
    environment.update(_stage_environment("local"))
    environment["AWS_ENDPOINT_URL"] = moto_url
    environment["PYTHONUNBUFFERED"] = "1"
    environment.update(overrides)
    return environment


# Botocore faults.


class _Body:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any):
        yield self._data


# (HTTP status, DynamoDB error type); every one is retryable in botocore's standard retry mode.
DYNAMODB_FAULTS = (
    (400, "ProvisionedThroughputExceededException"),
    (400, "ThrottlingException"),
    (500, "InternalServerError"),
)
S3_FAULTS = ((503, "SlowDown"), (500, "InternalError"))


class BotocoreFaults:
    """Returns a retryable error for a seeded fraction of requests instead of sending them.

    Registered on ``before-send``, which botocore emits once per attempt inside its retry loop, so
    an injected error is retried like a real one. The request never reaches moto, so no write
    happens behind a failed call.
    """

    def __init__(self, rate: float, seed: int) -> None:
        self.rate = rate
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.injected: Counter[str] = Counter()

    def install(self, client: Any) -> None:
        # First, so it responds before any other handler (mock_aws adds one that would).
        client.meta.events.register_first("before-send", self)

    def __call__(self, request: Any, **_: Any) -> Any:
        from botocore.awsrequest import AWSResponse

        service = "dynamodb" if "X-Amz-Target" in request.headers else "s3"
        with self.lock:
            if self.random.random() >= self.rate:
                return None
            faults = DYNAMODB_FAULTS if service == "dynamodb" else S3_FAULTS
            status, code = faults[self.random.randrange(len(faults))]
            self.injected[code] += 1
            count = sum(self.injected.values())
        logger.warning(
            "injected fault", extra={"service": service, "code": code, "injected_total": count}
        )
        if service == "dynamodb":
            body = json.dumps(
                {"__type": f"com.amazonaws.dynamodb.v20120810#{code}", "message": "injected"}
            ).encode()
            headers = {"Content-Type": "application/x-amz-json-1.0"}
        else:
            body = (
                f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                "<Message>injected</Message></Error>"
            ).encode()
            headers = {"Content-Type": "application/xml"}
        return AWSResponse(request.url, status, headers, _Body(body))


# The API process.


def serve_api(port: int, watchdog_seconds: float, fault_rate: float, fault_seed: int) -> None:
    """Serves the app on 127.0.0.1:port against the moto server in $AWS_ENDPOINT_URL."""
    from chalice.cli.factory import CLIFactory

    from chalicelib import aws, watchdog
    from chalicelib.config import load_settings
    from tandemn.resources import create_resources

    environment = dict(os.environ)
    if fault_rate > 0:
        faults = BotocoreFaults(fault_rate, fault_seed)
        for service in ("dynamodb", "s3"):
            faults.install(aws.client(service))
    factory = CLIFactory(str(PROJECT_DIR), environ=os.environ)
    config = factory.create_config_obj(chalice_stage_name="local")
    app = config.chalice_app
    # Loading the app copies the stage's fixed moto address into os.environ; ours wins.
    os.environ.update(environment)
    settings = load_settings()
    try:
        aws.client("dynamodb").describe_table(TableName=settings.jobs_table)
    except aws.client("dynamodb").exceptions.ResourceNotFoundException:
        create_resources(aws.client("dynamodb"), aws.client("s3"), settings)
    stop = threading.Event()

    def watchdog_loop() -> None:
        while not stop.wait(watchdog_seconds):
            try:
                watchdog.run_once(load_settings())
            except Exception:
                logger.exception("watchdog pass failed")

    threading.Thread(target=watchdog_loop, name="watchdog", daemon=True).start()
    server = factory.create_local_server(app, config, "127.0.0.1", port)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"API listening on http://127.0.0.1:{port}", flush=True)
    try:
        server.serve_forever()
    finally:
        stop.set()


def _spawn(command: list[str], log_path: Path, environment: dict[str, str]) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            cwd=PROJECT_DIR,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _stop_process(process: subprocess.Popen | None, number: int = signal.SIGTERM) -> None:
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, number)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


@dataclass
class Cluster:
    """A moto server and a restartable API process on 127.0.0.1."""

    name: str
    lease_seconds: int = 6
    watchdog_seconds: float = 1.0
    fault_rate: float = 0.0
    fault_seed: int = 0
    api_port: int = field(default_factory=free_port)
    moto_port: int = field(default_factory=free_port)
    moto: subprocess.Popen | None = None
    api: subprocess.Popen | None = None
    api_starts: int = 0
    # Processes the tests started against this cluster; stop() ends those still running.
    children: list[Any] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def moto_url(self) -> str:
        return f"http://127.0.0.1:{self.moto_port}"

    @property
    def log_dir(self) -> Path:
        return ARTIFACTS / self.name

    def environment(self, **overrides: str) -> dict[str, str]:
        return local_environment(
            self.moto_url, TANDEMN_LEASE_SECONDS=str(self.lease_seconds), **overrides
        )

    def start(self) -> Cluster:
        self.moto = _spawn(
            [sys.executable, "-m", "tandemn.motoserver", "--port", str(self.moto_port)],
            self.log_dir / "moto.log",
            self.environment(),
        )
        _wait_for_port(self.moto_port, 30, self.moto)
        self.start_api()
        return self

    def start_api(self, timeout: float = 60.0) -> None:
        self.api_starts += 1
        command = [sys.executable, "-m", "tests.fault_support", "api", "--port", str(self.api_port)]
        command += ["--watchdog-seconds", str(self.watchdog_seconds)]
        command += ["--fault-rate", str(self.fault_rate), "--fault-seed", str(self.fault_seed)]
        self.api = _spawn(command, self.log_dir / "api.log", self.environment())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.api.poll() is not None:
                raise RuntimeError(f"API process exited: {self.api_log()[-3000:]}")
            try:
                if httpx.get(f"{self.api_url}/jobs", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"API not ready in {timeout} s: {self.api_log()[-3000:]}")

    def kill_api(self) -> None:
        """SIGKILLs the API process: requests in flight are cut off mid-way."""
        _stop_process(self.api, signal.SIGKILL)
        self.api = None

    def api_log(self) -> str:
        path = self.log_dir / "api.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for child in self.children:
            if isinstance(child, ReplicaProcess):
                child.stop()
            elif child.poll() is None:
                os.kill(child.pid, signal.SIGCONT)
                _stop_process(child, signal.SIGKILL)
        _stop_process(self.api)
        _stop_process(self.moto)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # Driving the API as a user does.

    def client(self):
        from tandemn.api_client import ApiClient

        return ApiClient(self.api_url)

    def submit(self, ids: list[str], chunk_size: int, max_tokens: int = 16) -> str:
        lines = [
            {
                "custom_id": custom_id,
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "m",
                    "messages": [{"role": "user", "content": "Say hello."}],
                    "max_tokens": max_tokens,
                },
            }
            for custom_id in ids
        ]
        key = f"inputs/{self.name}-{time.monotonic_ns()}.jsonl"
        bucket = _stage_environment("local")["TANDEMN_BUCKET"]
        self.s3().put_object(
            Bucket=bucket, Key=key, Body=b"".join(json.dumps(l).encode() + b"\n" for l in lines)
        )
        submitted = self.client().post(
            "/submit/batch",
            {
                "model_name": "fake/model",
                "input_file": f"s3://{bucket}/{key}",
                "chunk_size": chunk_size,
            },
        )
        return submitted["job_id"]

    def add_replicas(self, job_id: str, count: int) -> dict[str, str]:
        scaled = self.client().post(
            f"/job/{job_id}/scale", {"count": count, "provider": "external"}
        )
        return scaled["replica_tokens"]

    def wait_for_job(self, job_id: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                job = self.client().get(f"/job/{job_id}")
            except (ApiError, httpx.HTTPError) as error:  # the API may be restarting
                logger.info("job status read failed", extra={"job_id": job_id, "error": str(error)})
            else:
                if job["status"] in TERMINAL:
                    return job
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} did not finish in {timeout} s: {job}")

    def dynamodb(self) -> Any:
        return aws_client("dynamodb", self.moto_url)

    def s3(self) -> Any:
        return aws_client("s3", self.moto_url)


def aws_client(service: str, moto_url: str) -> Any:
    return boto3.session.Session().client(
        service,
        endpoint_url=moto_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


# Replica processes.


@dataclass
class ReplicaProcess:
    """One external replica: a simulated engine plus ``python -m sidecar``."""

    replica_id: str
    engine: subprocess.Popen
    sidecar: subprocess.Popen

    def stop(self, number: int = signal.SIGKILL) -> None:
        for process in (self.sidecar, self.engine):
            if process.poll() is None:
                try:
                    os.kill(process.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            _stop_process(process, number)


def start_replica(
    cluster: Cluster,
    job_id: str,
    replica_id: str,
    token: str,
    *,
    slots: int = 2,
    ms_per_token: float = 2.0,
    drain_seconds: float = 10.0,
    spot_notice_url: str | None = None,
    metadata_token_url: str | None = None,
) -> ReplicaProcess:
    port = free_port()
    log_dir = cluster.log_dir
    environment = cluster.environment(TANDEMN_REPLICA_TOKEN=token)
    engine = _spawn(
        [
            sys.executable,
            "-m",
            "tandemn.fake_engine",
            "--port",
            str(port),
            "--slots",
            str(slots),
            "--ms-per-token",
            str(ms_per_token),
        ],
        log_dir / f"{replica_id}.engine.log",
        environment,
    )
    command = [
        sys.executable,
        "-m",
        "sidecar",
        "--api-url",
        cluster.api_url,
        "--job-id",
        job_id,
        "--replica-id",
        replica_id,
        "--engine-url",
        f"http://127.0.0.1:{port}",
        "--concurrency",
        str(slots),
        "--poll-interval",
        "0.5",
        "--heartbeat-interval",
        "2",
        "--metrics-interval",
        "0",
        "--drain-seconds",
        str(drain_seconds),
    ]
    if spot_notice_url:
        command += ["--spot-notice-url", spot_notice_url]
    if metadata_token_url:
        command += ["--metadata-token-url", metadata_token_url]
    sidecar = _spawn(command, log_dir / f"{replica_id}.sidecar.log", environment)
    replica = ReplicaProcess(replica_id, engine, sidecar)
    cluster.children.append(replica)
    return replica


def process_state(pid: int) -> str:
    """Returns the state letter of /proc/PID/stat: R, S, T (stopped), Z, or '' when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[0]


# The instance metadata service.


class FakeMetadataServer:
    """IMDSv2 on 127.0.0.1: PUT the token path for a session token, then GET the spot notice."""

    TOKEN_PATH = "/latest/api/token"
    NOTICE_PATH = "/latest/meta-data/spot/instance-action"

    def __init__(self) -> None:
        self.token = "imds-session-token"
        self.notice: dict[str, Any] | None = None
        self.notice_reads = 0
        self.unauthorised_reads = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                return

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:
                if self.path == server.TOKEN_PATH:
                    self._send(200, server.token.encode())
                else:
                    self._send(404, b"")

            def do_GET(self) -> None:
                if self.path != server.NOTICE_PATH:
                    self._send(404, b"")
                    return
                if self.headers.get("X-aws-ec2-metadata-token") != server.token:
                    server.unauthorised_reads += 1
                    self._send(401, b"")
                    return
                server.notice_reads += 1
                if server.notice is None:
                    self._send(404, b"")
                else:
                    self._send(200, json.dumps(server.notice).encode())

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeMetadataServer:
        self._thread.start()
        return self

    def announce_interruption(self) -> None:
        moment = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 120))
        self.notice = {"action": "terminate", "time": moment}

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# The invariants.


def _query_chunks(dynamodb: Any, table: str, job_id: str) -> list[dict[str, Any]]:
    from chalicelib import dynamo

    items: list[dict[str, Any]] = []
    query: dict[str, Any] = {
        "TableName": table,
        "KeyConditionExpression": "job_id = :job",
        "ExpressionAttributeValues": {":job": {"S": job_id}},
        "ConsistentRead": True,
    }
    while True:
        page = dynamodb.query(**query)
        items.extend(dynamo.deserialize(item) for item in page["Items"])
        if not page.get("LastEvaluatedKey"):
            return items
        query["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def _read_jsonl(s3: Any, uri: str) -> list[dict[str, Any]]:
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    return [json.loads(line) for line in body.splitlines() if line.strip()]


@dataclass
class JobReport:
    """What the checker found; tests assert on it beyond the invariants."""

    job: dict[str, Any]
    chunks: list[dict[str, Any]]
    output: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    replicas: list[dict[str, Any]]

    def chunk(self, chunk_id: str) -> dict[str, Any]:
        return next(c for c in self.chunks if c["chunk_id"] == chunk_id)


def check_job_invariants(moto_url: str, job_id: str, input_ids: list[str]) -> JobReport:
    """Asserts that job ``job_id`` lost nothing and counted nothing twice; returns what it read.

    Checked: the job ended; every input ``custom_id`` is in ``output.jsonl`` or ``errors.jsonl``
    exactly once and nothing else is; the job's counters equal the chunk items' statuses; no chunk
    is pending or inflight, or still queued; each completed chunk names an issued token, holds no
    lease and its winning output object exists; the replicas' completion counts and the live
    request counters add up to the completed chunks, so no completion counted twice.
    """
    from chalicelib import dynamo

    stage = _stage_environment("local")
    dynamodb, s3 = aws_client("dynamodb", moto_url), aws_client("s3", moto_url)
    job = dynamo.deserialize(
        dynamodb.get_item(
            TableName=stage["JOBS_TABLE"], Key={"job_id": {"S": job_id}}, ConsistentRead=True
        )["Item"]
    )
    assert job["status"] in ("succeeded", "completed_with_errors"), job["status"]

    chunks = _query_chunks(dynamodb, stage["CHUNKS_TABLE"], job_id)
    assert len(chunks) == int(job["total_chunks"]), (len(chunks), job["total_chunks"])
    assert sum(int(c["request_count"]) for c in chunks) == len(input_ids)
    counted = Counter(c["status"] for c in chunks)
    for status in ("pending", "inflight", "completed", "failed"):
        assert int(job[status]) == counted.get(status, 0), (status, job[status], counted)
    assert counted["completed"] + counted["failed"] == len(chunks), counted
    assert not (job.get("requeued") or set()), f"chunks still queued: {job.get('requeued')}"
    for chunk in chunks:
        assert "lease_token" not in chunk, f"{chunk['chunk_id']} still holds a lease"
        assert int(chunk["failures"]) <= int(os.environ.get("TANDEMN_MAX_CHUNK_FAILURES", "3"))
        if chunk["status"] != "completed":
            continue
        assert chunk["completed_token"] in chunk["tokens"], chunk["chunk_id"]
        expected_key = f"jobs/{job_id}/chunks/{chunk['chunk_id']}/{chunk['completed_token']}.jsonl"
        assert chunk["output_key"] == expected_key, chunk
        s3.head_object(Bucket=stage["TANDEMN_BUCKET"], Key=expected_key)

    replica_items = [
        dynamo.deserialize(item)
        for item in dynamodb.query(
            TableName=stage["REPLICAS_TABLE"],
            KeyConditionExpression="job_id = :job",
            ExpressionAttributeValues={":job": {"S": job_id}},
            ConsistentRead=True,
        )["Items"]
    ]
    completions = sum(int(r.get("chunks_completed", 0)) for r in replica_items)
    assert completions == counted["completed"], (completions, counted["completed"])
    completed_requests = sum(int(c["request_count"]) for c in chunks if c["status"] == "completed")
    live = int(job.get("live_requests_succeeded", 0)) + int(job.get("live_requests_failed", 0))
    assert live == completed_requests, (live, completed_requests)

    output = _read_jsonl(s3, job["output_file"])
    errors = _read_jsonl(s3, job["error_file"])
    seen = Counter(record["custom_id"] for record in output + errors)
    duplicated = sorted(custom_id for custom_id, count in seen.items() if count > 1)
    assert not duplicated, f"custom_ids written twice: {duplicated[:10]}"
    missing = sorted(set(input_ids) - set(seen))
    assert not missing, f"custom_ids lost: {missing[:10]}"
    unexpected = sorted(set(seen) - set(input_ids))
    assert not unexpected, f"custom_ids not in the input: {unexpected[:10]}"
    assert int(job["requests_succeeded"]) == len(output)
    assert int(job["requests_failed"]) == len(errors)
    if job["status"] == "succeeded":
        assert errors == []
    failed_ids = {r["custom_id"] for r in errors if r["error"]["code"] == "chunk_failed"}
    failed_chunk_requests = sum(int(c["request_count"]) for c in chunks if c["status"] == "failed")
    assert len(failed_ids) == failed_chunk_requests
    return JobReport(job, chunks, output, errors, replica_items)


async def pause_before_complete(api_url: str, job_id: str, replica_id: str, result: Path) -> None:
    """Acts as a replica that stops (SIGSTOP) between uploading a chunk's output and completing it.

    It pulls one chunk with the sidecar's own clients, uploads one record per request, writes the
    lease to ``result``, stops itself, and once continued (SIGCONT) completes the chunk and
    appends the completion's response to ``result``.
    """
    from sidecar.control import ControlPlaneClient, RequestRejected

    control = ControlPlaneClient(api_url, job_id, replica_id, os.environ["TANDEMN_REPLICA_TOKEN"])
    try:
        lease = await control.pull()
        assert lease is not None, "no chunk to pull"
        s3 = boto3.session.Session().client("s3")
        data = s3.get_object(
            Bucket=lease.input_bucket,
            Key=lease.input_key,
            Range=f"bytes={lease.byte_start}-{lease.byte_end - 1}",
        )["Body"].read()
        records = []
        for line in data.splitlines():
            custom_id = json.loads(line)["custom_id"]
            body = {"choices": [{"message": {"role": "assistant", "content": replica_id}}]}
            records.append(
                {
                    "id": f"batch_req_{custom_id}",
                    "custom_id": custom_id,
                    "response": {"status_code": 200, "request_id": custom_id, "body": body},
                    "error": None,
                }
            )
        s3.put_object(
            Bucket=lease.output_bucket,
            Key=lease.output_key,
            Body=b"".join(json.dumps(r).encode() + b"\n" for r in records),
        )
        result.write_text(json.dumps({"lease": lease.model_dump()}) + "\n")
        os.kill(os.getpid(), signal.SIGSTOP)
        try:
            answer = await control.complete(lease, len(records), 0)
        except RequestRejected as error:
            answer = {"rejected": error.status_code, "code": error.code}
        with result.open("a") as out:
            out.write(json.dumps({"completion": answer}) + "\n")
    finally:
        await control.aclose()


def start_pausing_replica(
    cluster: Cluster, job_id: str, replica_id: str, token: str, result: Path
) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "tests.fault_support",
        "pause-before-complete",
        "--api-url",
        cluster.api_url,
        "--job-id",
        job_id,
        "--replica-id",
        replica_id,
        "--result",
        str(result),
    ]
    process = _spawn(
        command,
        cluster.log_dir / f"{replica_id}.paused.log",
        cluster.environment(TANDEMN_REPLICA_TOKEN=token),
    )
    cluster.children.append(process)
    return process


def main() -> None:
    parser = argparse.ArgumentParser(description="Fault-injection helpers for the local stack")
    commands = parser.add_subparsers(dest="command", required=True)
    paused = commands.add_parser(
        "pause-before-complete", help="a replica that stops itself before completing a chunk"
    )
    paused.add_argument("--api-url", required=True, help="control-plane base URL")
    paused.add_argument("--job-id", required=True, help="job to pull from")
    paused.add_argument("--replica-id", required=True, help="replica id of the token")
    paused.add_argument("--result", type=Path, required=True, help="file for lease and completion")
    api = commands.add_parser("api", help="serve the app against $AWS_ENDPOINT_URL")
    api.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    api.add_argument("--watchdog-seconds", type=float, default=1.0, help="seconds between passes")
    api.add_argument(
        "--fault-rate",
        type=float,
        default=0.0,
        help="fraction of AWS requests answered with an error",
    )
    api.add_argument("--fault-seed", type=int, default=0, help="seed of the fault choices")
    arguments = parser.parse_args()
    from sidecar.logs import configure_logging

    configure_logging("INFO")
    if arguments.command == "pause-before-complete":
        import asyncio

        asyncio.run(
            pause_before_complete(
                arguments.api_url, arguments.job_id, arguments.replica_id, arguments.result
            )
        )
        return
    serve_api(
        arguments.port, arguments.watchdog_seconds, arguments.fault_rate, arguments.fault_seed
    )


if __name__ == "__main__":
    main()
