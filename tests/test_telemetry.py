"""Sidecar telemetry: streamed engine responses, client-side latencies, buffered sends."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import pytest

from sidecar.control import ControlPlaneClient, ControlPlaneUnavailable, RequestRejected
from sidecar.engine import EngineClient, StreamAssembler
from sidecar.fakes import FakeEngine
from sidecar.runner import Runner
from sidecar.storage import ChunkStorage
from sidecar.telemetry import ClientMetrics, GpuMonitor, Telemetry, histogram_quantile
from tandemn import fake_engine
from tests.test_metrics import page
from tests.test_sidecar import (  # noqa: F401 (s3 and servers are fixtures)
    FAST_ENGINE_RETRY,
    FAST_RETRY,
    JOB_ID,
    REPLICA_ID,
    TOKEN,
    new_control,
    request_line,
    s3,
    servers,
    upload_leases,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def streaming_engine():
    server = fake_engine.serve(free_port(), slots=2, ms_per_token=5.0, context_chars=8000)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def chat_body(max_tokens: int) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": max_tokens,
    }


def test_assembler_builds_non_streamed_chat_body():
    assembler = StreamAssembler(chat=True)
    events = [
        {
            "id": "c1",
            "created": 5,
            "model": "m",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}],
        },
        {"id": "c1", "choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {"content": "lo"}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {
            "id": "c1",
            "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        },
    ]
    carried = [assembler.add(event) for event in events]
    assert carried == [False, True, True, False, False]
    body = assembler.body()
    assert body["object"] == "chat.completion"
    assert body["id"] == "c1"
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}
    ]
    assert body["usage"]["completion_tokens"] == 2


def test_assembler_builds_text_completion_body():
    assembler = StreamAssembler(chat=False)
    assembler.add({"id": "t", "choices": [{"index": 0, "text": "a"}]})
    assembler.add({"id": "t", "choices": [{"index": 0, "text": "b", "finish_reason": "length"}]})
    body = assembler.body()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "ab"
    assert body["choices"][0]["finish_reason"] == "length"


def test_streaming_client_measures_latency(streaming_engine):
    async def main():
        engine = EngineClient(streaming_engine, concurrency=2)
        metrics = ClientMetrics()
        engine.observer = metrics
        engine.enable_streaming()
        try:
            # The server closes each streamed connection; three requests in a row must all work.
            results = [
                await engine.create_completion("/v1/chat/completions", chat_body(6))
                for _ in range(3)
            ]
        finally:
            await engine.aclose()
        return results, metrics

    results, metrics = asyncio.run(main())
    for result in results:
        assert result.ok, result
        assert result.attempts == 1
        assert result.body["choices"][0]["message"]["content"] == "ok ok ok ok ok ok"
        assert result.body["choices"][0]["finish_reason"] == "length"
        assert result.body["usage"]["completion_tokens"] == 6
    assert metrics.counters["request_success"] == 3
    assert metrics.counters["live_generation_tokens"] == 18
    assert metrics.histograms["time_to_first_token_seconds"].count == 3
    assert metrics.histograms["time_per_output_token_seconds"].count == 3
    ttft = histogram_quantile(0.5, metrics.histograms["time_to_first_token_seconds"].buckets)
    tpot = histogram_quantile(0.5, metrics.histograms["time_per_output_token_seconds"].buckets)
    # 5 ms per token on the fake engine; the buckets bound the estimates.
    assert 0 < ttft <= 0.1
    assert 0 < tpot <= 0.025


def test_streaming_client_reads_plain_json_answer():
    """An engine that ignores ``stream`` (the fake in sidecar/fakes.py) still works."""
    engine_server = FakeEngine().start()

    async def main():
        engine = EngineClient(engine_server.url)
        engine.observer = ClientMetrics()
        engine.enable_streaming()
        try:
            return await engine.create_completion(
                "/v1/chat/completions", chat_body(4)
            ), engine.observer
        finally:
            await engine.aclose()

    try:
        result, metrics = asyncio.run(main())
    finally:
        engine_server.stop()
    assert result.ok
    assert metrics.counters["request_success"] == 1
    assert metrics.counters["live_generation_tokens"] == 4
    # Without a stream there is no first-token time.
    assert metrics.histograms["time_to_first_token_seconds"].count == 0


class FakeEngineMetrics:
    def __init__(self, pages: list[str | None]) -> None:
        self.pages = pages
        self.observer = None
        self.streaming = False

    async def metrics_text(self) -> str | None:
        return self.pages.pop(0) if len(self.pages) > 1 else self.pages[0]

    def enable_streaming(self) -> None:
        self.streaming = True


class FlakyControl:
    job_id = "job-1"
    replica_id = "job-1-r0"

    def __init__(self) -> None:
        self.fail = 0
        self.reject_status: int | None = None
        self.sent: list[dict[str, Any]] = []
        self.summaries: list[dict[str, Any]] = []

    async def ingest_metrics(self, session, snapshots, dropped):
        if self.reject_status is not None:
            raise RequestRejected(self.reject_status, "conflict", "closed")
        if self.fail:
            self.fail -= 1
            raise ControlPlaneUnavailable("down", 503, 1)
        self.sent.append({"session": session, "snapshots": list(snapshots), "dropped": dropped})
        return {"ok": True}

    async def post_metrics_summary(self, metrics, retry=None):
        self.summaries.append(metrics)
        return {"ok": True}


class NoGpu(GpuMonitor):
    def __init__(self) -> None:
        self._handles = []
        self._nvml = None


def test_failed_sends_are_kept_and_oldest_dropped():
    control = FlakyControl()
    engine = FakeEngineMetrics([page("vllm_v1_before"), page("vllm_v1_after")])
    telemetry = Telemetry(control, engine, interval=3600, buffer_limit=3, gpu=NoGpu())

    async def main():
        control.fail = 10
        await telemetry.start()  # queues snapshot 0, then the loop waits an hour
        for _ in range(4):
            await telemetry.tick()  # snapshots 1..4; every send fails
        assert [s["seq"] for s in telemetry.buffer] == [2, 3, 4]
        assert telemetry.dropped == 2
        control.fail = 0
        await telemetry.tick()
        await telemetry.close({"requests_succeeded": 5})

    asyncio.run(main())
    first = control.sent[0]
    # The buffer was trimmed to 3 again before the successful send: 3, 4, 5.
    assert [s["seq"] for s in first["snapshots"]] == [3, 4, 5]
    assert first["dropped"] == 3
    assert control.sent[1]["dropped"] == 0
    assert engine.streaming is False  # vLLM pages: the engine's own latencies are used
    assert control.summaries[0]["requests_succeeded"] == 5


def test_snapshots_carry_deltas_not_pages():
    control = FlakyControl()
    engine = FakeEngineMetrics([page("vllm_v0_before"), page("vllm_v0_after")])
    telemetry = Telemetry(control, engine, interval=3600, gpu=NoGpu())

    async def main():
        await telemetry.start()
        await telemetry.tick()
        await telemetry.close({})

    asyncio.run(main())
    snapshots = [s for batch in control.sent for s in batch["snapshots"]]
    assert "prometheus_text" not in snapshots[0]
    assert snapshots[0]["counters"]["generation_tokens"] == 0
    assert snapshots[1]["counters"]["generation_tokens"] == 4000
    ttft = snapshots[1]["histograms"]["time_to_first_token_seconds"]
    assert ttft["count"] == 40
    assert ttft["buckets"]["0.25"] == 20
    # The last flush at close sends one more snapshot with nothing new.
    assert snapshots[2]["counters"]["generation_tokens"] == 0
    summary = control.summaries[0]
    assert summary["total_output_tokens"] == 4000
    assert summary["ttft_ms_p50"] == pytest.approx(250.0)


def test_engine_without_vllm_metrics_switches_to_streaming():
    control = FlakyControl()
    engine = FakeEngineMetrics(
        ["# TYPE llamacpp:tokens_predicted_total counter\nllamacpp:tokens_predicted_total 0\n"]
    )
    telemetry = Telemetry(control, engine, interval=3600, gpu=NoGpu())

    async def main():
        await telemetry.start()
        await telemetry.close({})

    asyncio.run(main())
    assert engine.streaming is True
    assert control.sent[0]["snapshots"][0]["mode"] == "client"


def test_closed_metrics_stop_sending():
    control = FlakyControl()
    control.reject_status = 409
    engine = FakeEngineMetrics([page("vllm_v0_before")])
    telemetry = Telemetry(control, engine, interval=3600, gpu=NoGpu())

    async def main():
        await telemetry.start()
        await telemetry.tick()
        return telemetry.closed, len(telemetry.buffer)

    closed, queued = asyncio.run(main())
    assert closed is True
    assert queued == 0


def test_gpu_monitor_reads_nvml(monkeypatch):
    import sys
    import types

    class Rates:
        def __init__(self, gpu, memory):
            self.gpu, self.memory = gpu, memory

    class Memory:
        used, total = 40e9, 80e9

    nvml = types.SimpleNamespace(
        NVMLError=RuntimeError,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUtilizationRates=lambda h: Rates(90 if h == 0 else 70, 40 if h == 0 else 20),
        nvmlDeviceGetMemoryInfo=lambda h: Memory(),
    )
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    reading = GpuMonitor().read()
    assert reading["gpu_sm_util_pct"] == 80.0
    assert reading["gpu_mem_bw_util_pct"] == 30.0
    assert reading["per_gpu"]["gpu1_sm_pct"] == 70.0
    assert reading["per_gpu"]["gpu0_mem_gb"] == 40.0
    assert reading["per_gpu"]["gpu0_mem_pct"] == 50.0


def test_gpu_monitor_without_driver_is_off():
    # This machine has nvidia-ml-py but no NVIDIA driver: nvmlInit raises NVMLError.
    monitor = GpuMonitor()
    if monitor.available:
        pytest.skip("an NVIDIA driver is present")
    assert monitor.read() == {}


def run_with_telemetry(control_url: str, engine_url: str, interval: float) -> int:
    """Runs a replica's sidecar with telemetry until the job ends; returns its exit code."""

    async def main():
        control_client = ControlPlaneClient(
            control_url, JOB_ID, REPLICA_ID, TOKEN, retry=FAST_RETRY
        )
        engine = EngineClient(engine_url, retry=FAST_ENGINE_RETRY)
        telemetry = Telemetry(control_client, engine, interval=interval, gpu=NoGpu())
        runner = Runner(
            control_client,
            engine,
            ChunkStorage(retry=FAST_RETRY),
            poll_interval=0.05,
            health_poll_interval=0.05,
            telemetry=telemetry,
        )
        try:
            return await asyncio.wait_for(runner.run(), 20)
        finally:
            await control_client.aclose()
            await engine.aclose()

    return asyncio.run(main())


def test_runner_sends_summary_before_replica_complete(s3, servers):  # noqa: F811
    lines = [request_line(f"req-{i}", max_tokens=4) for i in range(6)]
    leases = upload_leases(s3, "telemetry.jsonl", lines, chunk_size=3)
    control = servers(new_control(leases))
    engine_server = servers(FakeEngine(slots=4))

    assert run_with_telemetry(control.url, engine_server.url, interval=0.05) == 0
    routes = [route for route, _ in control.calls]
    assert "metrics/ingest" in routes
    assert routes.index("metrics/summary") < len(routes) - 1
    assert routes[-1] == "phase"
    assert control.phases[-1] == "replica_complete"
    summary = control.calls_to("metrics/summary")[0]["metrics"]
    assert summary["requests_succeeded"] == 6
    assert summary["chunks_completed"] == 2
    # The fake engine answers 4 tokens per request; completions report them to the job.
    completions = control.calls_to("chunks/complete")
    assert sum(c["generation_tokens"] for c in completions) == 24
    sent = [s for body in control.calls_to("metrics/ingest") for s in body["snapshots"]]
    assert sum(s["counters"].get("live_generation_tokens", 0) for s in sent) == 24


def test_runner_sends_metrics_before_each_completion(s3, servers):  # noqa: F811
    lines = [request_line(f"req-{i}", max_tokens=4) for i in range(6)]
    leases = upload_leases(s3, "before-complete.jsonl", lines, chunk_size=3)
    control = servers(new_control(leases))
    engine_server = servers(FakeEngine(slots=4))

    # An hour between periodic snapshots: only the start, the completions and the close send.
    assert run_with_telemetry(control.url, engine_server.url, interval=3600) == 0
    routes = [route for route, _ in control.calls]
    completions = [i for i, route in enumerate(routes) if route == "chunks/complete"]
    assert len(completions) == 2
    for index in completions:
        assert routes[index - 1] == "metrics/ingest", routes
    # The snapshots sent before the last completion already count every request's tokens.
    last = completions[-1]
    before = [
        snapshot
        for route, body in control.calls[:last]
        if route == "metrics/ingest"
        for snapshot in body["snapshots"]
    ]
    assert sum(s["counters"].get("live_generation_tokens", 0) for s in before) == 24

