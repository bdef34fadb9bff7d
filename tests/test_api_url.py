"""The local stack's address as the CLI finds it (the variable, then the running local stack,
then 26336) and how the stack's API server logs failed requests."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from tandemn.api_client import DEFAULT_API_URL, default_api_url


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEMN_LOCAL_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("TANDEMN_API_URL", raising=False)
    return tmp_path


def record_stack(state_dir, pid: int, api_url: str) -> None:
    (state_dir / "stack.pid").write_text(str(pid))
    (state_dir / "stack.json").write_text(json.dumps({"api_url": api_url}))


def test_running_stack_url_is_default(state_dir):
    record_stack(state_dir, os.getpid(), "http://127.0.0.1:27400")
    assert default_api_url() == "http://127.0.0.1:27400"


def test_variable_overrides_running_stack(state_dir, monkeypatch):
    record_stack(state_dir, os.getpid(), "http://127.0.0.1:27400")
    monkeypatch.setenv("TANDEMN_API_URL", "http://127.0.0.1:27500")
    assert default_api_url() == "http://127.0.0.1:27500"


def test_stale_pid_uses_default_port(state_dir):
    exited = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    record_stack(state_dir, int(exited.stdout), "http://127.0.0.1:27400")
    assert default_api_url() == DEFAULT_API_URL


@pytest.mark.parametrize("pid_text, stack_text", [("", "{}"), ("12x", "{}"), ("1", "not json")])
def test_unreadable_files_use_default_port(state_dir, pid_text, stack_text):
    (state_dir / "stack.pid").write_text(pid_text)
    (state_dir / "stack.json").write_text(stack_text)
    assert default_api_url() == DEFAULT_API_URL


def test_no_files_use_default_port(state_dir):
    assert default_api_url() == DEFAULT_API_URL


def test_request_error_log_closed_connection(caplog):
    from tandemn import stack

    caplog.set_level(logging.INFO, logger=stack.logger.name)
    try:
        raise BrokenPipeError(32, "Broken pipe")
    except BrokenPipeError:
        stack._log_request_error(None, ("127.0.0.1", 50123))
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert record.exc_info is None
    assert record.client_port == 50123


def test_request_error_log_other_error(caplog):
    from tandemn import stack

    try:
        raise ValueError("bad header")
    except ValueError:
        stack._log_request_error(None, ("127.0.0.1", 50123))
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert record.exc_info[0] is ValueError
