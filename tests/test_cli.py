"""The ``tandemn`` CLI against a running local stack with the simulated engine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tandemn.cli import app
from tests import support
from tests.localstack_support import PROJECT_DIR, StackProcess

runner = CliRunner()


@pytest.fixture(scope="module")
def stack():
    process = StackProcess("--engine", "fake", "--watchdog-seconds", "1", log_path=PROJECT_DIR / "test-artifacts" / "cli-stack.log")
    try:
        process.wait_ready()
        yield process
    finally:
        assert process.stop() == 0


def invoke(stack, *arguments: str):
    return runner.invoke(app, [*arguments], env={"TANDEMN_API_URL": stack.url}, catch_exceptions=False)


def test_deploy_missing_file_exits_nonzero(stack, tmp_path):
    result = invoke(stack, "deploy", "fake/model", str(tmp_path / "absent.jsonl"))
    assert result.exit_code == 1
    assert "absent.jsonl not found" in result.output


def test_deploy_malformed_jsonl_prints_line_number(stack, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(support.jsonl([support.request_line("a")]) + b'{"custom_id": "b", oops\n')
    result = invoke(stack, "deploy", "fake/model", str(path))
    assert result.exit_code == 1
    assert "HTTP 400" in result.output
    assert "line 2" in result.output


def test_deploy_wait_status_and_download(stack, tmp_path):
    path = tmp_path / "good.jsonl"
    ids = [f"cli-{i}" for i in range(6)]
    path.write_bytes(support.jsonl([support.request_line(i, max_tokens=10) for i in ids]))
    result = invoke(stack, "deploy", "fake/model", str(path), "--replicas", "1", "--chunk-size", "2", "--wait")
    assert result.exit_code == 0, result.output
    assert "succeeded: 6 succeeded, 0 failed" in result.output

    listing = invoke(stack, "status", "--json")
    assert listing.exit_code == 0
    job_id = json.loads(listing.output)["jobs"][0]["job_id"]
    detail = invoke(stack, "status", job_id)
    assert detail.exit_code == 0
    assert "succeeded" in detail.output

    destination = tmp_path / "result" / "output.jsonl"
    downloaded = invoke(stack, "download", job_id, "-o", str(destination))
    assert downloaded.exit_code == 0, downloaded.output
    records = [json.loads(line) for line in destination.read_text().splitlines()]
    assert [r["custom_id"] for r in records] == ids
    assert (tmp_path / "result" / "errors.jsonl").read_text() == ""


def test_progress_of_unknown_job_prints_404(stack):
    result = invoke(stack, "progress", "no-such-job")
    assert result.exit_code == 1
    assert "HTTP 404" in result.output


def test_status_without_stack_explains_how_to_start(tmp_path):
    result = runner.invoke(app, ["status"], env={"TANDEMN_API_URL": "http://127.0.0.1:9"})
    assert result.exit_code == 1
    assert "tandemn local up" in result.output


def test_download_before_finish_is_conflict(stack, tmp_path):
    path = tmp_path / "slow.jsonl"
    path.write_bytes(support.jsonl([support.request_line("slow", max_tokens=5000)]))
    result = invoke(stack, "deploy", "fake/model", str(path), "--replicas", "1", "--json")
    job_id = json.loads(result.output)["job_id"]
    early = invoke(stack, "download", job_id, "-o", str(tmp_path / "o.jsonl"))
    assert early.exit_code == 1
    assert "HTTP 409" in early.output


def test_cli_help_describes_units():
    result = subprocess.run(
        [sys.executable, "-m", "tandemn.cli", "deploy", "--help"],
        capture_output=True,
        text=True,
        cwd=PROJECT_DIR,
        check=False,
    )
    assert result.returncode == 0
    assert "in hours" in result.stdout
    assert "in tokens" in result.stdout
