"""``make demo``'s program, run with the simulated engine so it is quick."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.localstack_support import PROJECT_DIR, free_port_pair, processes_with_argument


def start_demo(tmp_path, port: int) -> subprocess.Popen:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    environment.update(
        {
            "TANDEMN_DEMO_ENGINE": "fake",
            "TANDEMN_DEMO_PORT": str(port),
            "TANDEMN_DEMO_OUTPUT": str(tmp_path / "output.jsonl"),
        }
    )
    return subprocess.Popen(
        [sys.executable, "-m", "tandemn.demo"],
        cwd=PROJECT_DIR,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_demo_writes_one_record_per_request(tmp_path):
    port = free_port_pair()
    demo = start_demo(tmp_path, port)
    output, _ = demo.communicate(timeout=300)
    assert demo.returncode == 0, output
    records = [json.loads(line) for line in (tmp_path / "output.jsonl").read_text().splitlines()]
    expected = [
        json.loads(line)["custom_id"]
        for line in (PROJECT_DIR / "examples" / "demo_batch.jsonl").read_text().splitlines()
    ]
    assert [r["custom_id"] for r in records] == expected
    assert "requests succeeded: 30" in output
    assert "tokens per second" in output
    assert processes_with_argument(f"--port {port + 1}") == []


def test_interrupted_demo_leaves_nothing_running(tmp_path):
    port = free_port_pair()
    demo = start_demo(tmp_path, port)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not processes_with_argument(f"http://127.0.0.1:{port}"):
        time.sleep(0.1)
    sidecars = processes_with_argument(f"http://127.0.0.1:{port}")
    assert sidecars, "the demo never started a replica"
    demo.send_signal(signal.SIGINT)
    output, _ = demo.communicate(timeout=120)
    assert demo.returncode == 130, output
    assert processes_with_argument(f"http://127.0.0.1:{port}") == []
    assert processes_with_argument(f"--port {port + 1}") == []
