"""Metrics end to end: llama.cpp's llama-server, the sidecar's streamed requests, the CLI."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from tandemn.api_client import ApiClient, ApiError
from tandemn.cli import app
from tests import support
from tests.localstack_support import PROJECT_DIR, llama_stack, wait_for_job

ARTIFACTS = PROJECT_DIR / "test-artifacts"
RATE_FIELDS = ("avg_generation_throughput_toks_per_s", "ttft_ms_p50", "tpot_ms_p50")


def cli_json(*arguments: str) -> dict:
    result = CliRunner().invoke(app, [*arguments, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.slow
def test_cli_metrics_during_llama_job(tmp_path, monkeypatch):
    # The local provider passes its environment to each sidecar: snapshots every 2 s.
    monkeypatch.setenv("TANDEMN_METRICS_INTERVAL", "2")
    stack = llama_stack(ARTIFACTS / "metrics-stack.log")
    try:
        stack.wait_ready()
        client = ApiClient(stack.url)
        lines = [
            support.request_line(
                f"m-{i:03d}", content="Write two sentences about the sea.", max_tokens=48
            )
            for i in range(24)
        ]
        (tmp_path / "in.jsonl").write_bytes(support.jsonl(lines))
        uri = client.upload(tmp_path / "in.jsonl")
        submitted = client.post(
            "/submit/batch",
            {
                "model_name": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "input_file": uri,
                "replicas": 1,
                "chunk_size": 4,
            },
        )
        job_id = submitted["job_id"]
        api = ["--api-url", stack.url]

        seen = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            status = client.get(f"/job/{job_id}")["status"]
            if status in ("succeeded", "completed_with_errors", "failed", "cancelled"):
                break
            try:
                metrics = client.get(f"/job/{job_id}/metrics")
            except ApiError:
                metrics = None
            if metrics and all(metrics.get(name) is not None for name in RATE_FIELDS):
                seen = cli_json("metrics", job_id, *api)
                still_running = client.get(f"/job/{job_id}")["status"]
                if still_running not in ("succeeded", "completed_with_errors"):
                    break
            time.sleep(1.0)
        assert seen is not None, (
            f"no rates while the job ran: {client.get(f'/job/{job_id}/metrics')}"
        )
        job_metrics = seen["job"]
        for name in RATE_FIELDS:
            assert job_metrics[name] is not None, name
            assert job_metrics[name] > 0, name
        assert job_metrics["live_gen_tokens_total"] > 0
        # llama.cpp counts tokens in llamacpp:tokens_predicted_total.
        assert job_metrics["generation_tokens_total"] is not None

        job = wait_for_job(client, job_id, timeout=600)
        assert job["status"] == "succeeded", job
        assert job["cost"]["accrued_usd"] == 0.0
        # Assembly writes the run report just after the job ends, and the replica's summary may
        # arrive after that and rewrite it.
        deadline = time.monotonic() + 30
        run = None
        while time.monotonic() < deadline:
            try:
                report = client.get(f"/analytics/runs/{job_id}")["run"]
            except ApiError:
                report = None
            if report is not None and report["replicas"][0]["summary"] is not None:
                run = cli_json("inspect", job_id, "--replicas", *api)
                break
            time.sleep(0.5)
        assert run is not None, "no run report with the replica's summary within 30 s"
        assert run["requests"]["succeeded"] == 24
        assert run["tokens"]["generation"] > 0
        assert run["latency"]["ttft_ms_p50"] is not None
        assert run["replicas"][0]["summary"]["requests_succeeded"] == 24
        # Each completion follows a snapshot of its requests, so the final counters cover them.
        final = client.get(f"/job/{job_id}/metrics")
        assert final["request_success_total"] == 24
        assert final["live_gen_tokens_total"] == run["tokens"]["generation"]
        assert final["generation_tokens_total"] == run["tokens"]["generation"]
        assert run["engine_tokens"]["generation"] == run["tokens"]["generation"]
        history = cli_json("history", *api)
        assert job_id in [r["run_id"] for r in history["runs"]]
        series = cli_json("timeseries", job_id, *api)
        assert series["count"] >= 2
        events = client.get(f"/job/{job_id}/events")["events"]
        assert any(e["kind"] == "job_status" and e["status"] == "succeeded" for e in events)
    finally:
        assert stack.stop() == 0
