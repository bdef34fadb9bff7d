"""End to end on the local stack: moto server, Chalice's local server, sidecars and engines."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tandemn.api_client import ApiClient, ApiError
from tests import support
from tests.localstack_support import (
    PROJECT_DIR,
    StackProcess,
    llama_stack,
    processes_with_argument,
    wait_for_job,
)

ARTIFACTS = PROJECT_DIR / "test-artifacts"


def write_input(
    path: Path, count: int, max_tokens: int, prompt: str = "Name a colour."
) -> list[str]:
    ids = [f"e2e-{i:03d}" for i in range(count)]
    path.write_bytes(
        support.jsonl([support.request_line(i, content=prompt, max_tokens=max_tokens) for i in ids])
    )
    return ids


def fetch_records(client: ApiClient, job_id: str, folder: Path) -> tuple[list[dict], list[dict]]:
    links = client.get(f"/job/{job_id}/output")
    client.download(links["output_url"], folder / "output.jsonl")
    client.download(links["error_url"], folder / "errors.jsonl")
    read = lambda name: [
        json.loads(l) for l in (folder / name).read_text().splitlines() if l.strip()
    ]
    return read("output.jsonl"), read("errors.jsonl")


@pytest.fixture
def fake_stack(tmp_path):
    stack = StackProcess(
        "--engine",
        "fake",
        "--watchdog-seconds",
        "1",
        "--lease-seconds",
        "6",
        log_path=ARTIFACTS / "fake-stack.log",
    )
    try:
        stack.wait_ready()
        yield stack
    finally:
        assert stack.stop() == 0


def test_fake_engine_job_runs_end_to_end(fake_stack, tmp_path):
    client = ApiClient(fake_stack.url)
    ids = write_input(tmp_path / "in.jsonl", 40, max_tokens=20)
    uri = client.upload(tmp_path / "in.jsonl")
    submitted = client.post(
        "/submit/batch",
        {"model_name": "fake/model", "input_file": uri, "replicas": 2, "chunk_size": 4},
    )
    assert len(submitted["replicas"]) == 2
    job = wait_for_job(client, submitted["job_id"], timeout=120)
    assert job["status"] == "succeeded"
    output, errors = fetch_records(client, submitted["job_id"], tmp_path)
    assert [r["custom_id"] for r in output] == ids
    assert errors == []
    assert all(r["response"]["status_code"] == 200 for r in output)


def test_stack_stops_every_replica_process(tmp_path):
    stack = StackProcess("--engine", "fake", log_path=ARTIFACTS / "stop-stack.log")
    stack.wait_ready()
    client = ApiClient(stack.url)
    write_input(tmp_path / "in.jsonl", 4, max_tokens=2000)
    uri = client.upload(tmp_path / "in.jsonl")
    submitted = client.post(
        "/submit/batch",
        {"model_name": "fake/model", "input_file": uri, "replicas": 2, "chunk_size": 1},
    )
    job_id = submitted["job_id"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(processes_with_argument(f"--job-id {job_id}")) < 2:
        time.sleep(0.2)
    assert len(processes_with_argument(f"--job-id {job_id}")) == 2
    assert stack.stop() == 0
    assert processes_with_argument(f"--job-id {job_id}") == []
    assert processes_with_argument(f"--port {stack.port + 1}") == []


@pytest.mark.slow
def test_real_engine_survives_sigkill_of_a_replica(tmp_path):
    stack = llama_stack(ARTIFACTS / "llama-stack.log", "--lease-seconds", "15")
    try:
        stack.wait_ready()
        client = ApiClient(stack.url)
        ids = write_input(
            tmp_path / "in.jsonl", 12, max_tokens=24, prompt="Write one sentence about the sea."
        )
        uri = client.upload(tmp_path / "in.jsonl")
        # llama-server serves only its SmolLM2 file, so another model name is rejected.
        with pytest.raises(ApiError) as rejected:
            client.post("/submit/batch", {"model_name": "org/Other-8B", "input_file": uri})
        assert rejected.value.status_code == 400
        assert "SmolLM2-135M-Instruct" in str(rejected.value)
        submitted = client.post(
            "/submit/batch",
            {
                "model_name": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "input_file": uri,
                "replicas": 2,
                "chunk_size": 2,
            },
        )
        job_id = submitted["job_id"]
        victim = submitted["replicas"][0]

        # Wait until the victim holds a lease, then kill its sidecar and engine mid-chunk.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            replicas = client.get(f"/job/{job_id}/replicas")["replicas"]
            phases = {r["replica_id"]: r["phase"] for r in replicas}
            job = client.get(f"/job/{job_id}")
            if phases.get(victim) == "running" and job["chunks"]["inflight"] >= 1:
                break
            time.sleep(0.2)
        else:
            pytest.fail(
                f"replica {victim} never started work: {client.get(f'/job/{job_id}/replicas')}"
            )
        pids = processes_with_argument(f"--replica-id {victim}")
        assert pids, "sidecar process of the victim not found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

        job = wait_for_job(client, job_id, timeout=600)
        assert job["status"] == "succeeded", job
        output, errors = fetch_records(client, job_id, tmp_path)
        seen = [r["custom_id"] for r in output] + [r["custom_id"] for r in errors]
        assert sorted(seen) == sorted(ids)
        assert len(seen) == len(set(seen))
        contents = [r["response"]["body"]["choices"][0]["message"]["content"] for r in output]
        assert all(text.strip() for text in contents)
        # The engine names the model as the job did, not by the path of its GGUF file.
        models = {r["response"]["body"]["model"] for r in output}
        assert models == {"HuggingFaceTB/SmolLM2-135M-Instruct"}
    finally:
        assert stack.stop() == 0


@pytest.fixture
def long_lease_stack():
    # The pulling threads of the test below never renew, so their leases must outlive the test.
    stack = StackProcess("--engine", "fake", log_path=ARTIFACTS / "race-stack.log")
    try:
        stack.wait_ready()
        yield stack
    finally:
        assert stack.stop() == 0


def test_concurrent_pulls_never_double_assign(long_lease_stack, tmp_path):
    """Pulls race through the threaded API server and the moto server's serialised DynamoDB."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    fake_stack = long_lease_stack
    client = ApiClient(fake_stack.url)
    write_input(tmp_path / "in.jsonl", 60, max_tokens=100_000)
    uri = client.upload(tmp_path / "in.jsonl")
    # One local replica starts with the job and takes at most 2 chunks; its requests run for
    # minutes on the simulated engine, so it finishes nothing during the test.
    submitted = client.post(
        "/submit/batch",
        {"model_name": "fake/model", "input_file": uri, "replicas": 1, "chunk_size": 1},
    )
    job_id = submitted["job_id"]
    tokens = client.post(f"/job/{job_id}/scale", {"count": 8, "provider": "external"})["replica_tokens"]

    def drain(item):
        replica_id, token = item
        leased = []
        with httpx.Client(base_url=fake_stack.url, timeout=60) as http:
            while True:
                response = http.post(
                    f"/job/{job_id}/chunks/pull",
                    json={"replica_id": replica_id},
                    headers={"Authorization": f"Bearer {token}"},
                )
                if response.status_code == 204:
                    return leased
                assert response.status_code == 200, response.text
                leased.append(response.json()["chunk_id"])

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(drain, tokens.items()))
    pulled = [chunk for result in results for chunk in result]
    assert len(pulled) == len(set(pulled))
    progress = client.get(f"/job/{job_id}")["chunks"]
    assert progress["pending"] == 0
    assert progress["inflight"] == 60
    assert 58 <= len(pulled) <= 60
