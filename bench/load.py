"""Load test of the replica routes: many replicas pull, renew and complete at once on the local stack.

Starts a moto server process and an API process (Chalice's local server, the ``local`` stage),
submits a job of ``--chunks`` one-request chunks, registers ``--replicas`` external replicas and
runs each as a thread with its own HTTP connection. A replica pulls a chunk, renews its lease
once, uploads a synthetic output object to S3 (moto) and completes the chunk, until a pull
returns 204 and the job has no chunk left. No engine runs.

It prints pulls per second and the p50/p95/p99 latency of each route. It checks that no chunk was
leased twice: the leases outlive the run, so any second lease is a double assignment. It also checks
that every chunk completed once and that the assembled output has every ``custom_id`` exactly once.

Run: ``python bench/load.py --chunks 20000 --replicas 64``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

try:
    from _harness import machine_line
except ModuleNotFoundError:  # imported as bench.load by the tests
    from bench._harness import machine_line

import httpx

from tests.fault_support import Cluster, aws_client, check_job_invariants

ROUTES = ("pull", "renew", "complete")
# A route that returns 5xx (a pull that lost too many races returns 503) is retried after this
# pause, at most this many times.
RETRY_PAUSE_SECONDS = 0.2
MAX_RETRIES = 20


@dataclass
class LoadResult:
    job_id: str
    input_ids: list[str]
    seconds: float
    latencies: dict[str, list[float]]
    leases: dict[str, list[str]]
    completions: Counter
    retried: Counter = field(default_factory=Counter)
    answers: Counter = field(default_factory=Counter)

    @property
    def pulls(self) -> int:
        return sum(len(tokens) for tokens in self.leases.values())

    @property
    def double_assignments(self) -> list[str]:
        return sorted(chunk for chunk, tokens in self.leases.items() if len(tokens) > 1)

    def quantiles(self, route: str) -> tuple[float, float, float]:
        values = sorted(self.latencies[route])
        cuts = statistics.quantiles(values, n=100, method="inclusive")
        return cuts[49] * 1000, cuts[94] * 1000, cuts[98] * 1000


def _input_lines(ids: list[str]) -> bytes:
    return b"".join(
        json.dumps(
            {
                "custom_id": custom_id,
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
            }
        ).encode()
        + b"\n"
        for custom_id in ids
    )


class Replica(threading.Thread):
    def __init__(
        self, cluster: Cluster, job_id: str, replica_id: str, token: str, result: LoadResult
    ):
        super().__init__(name=replica_id, daemon=True)
        self.cluster, self.job_id, self.replica_id = cluster, job_id, replica_id
        self.result = result
        self.lock = threading.Lock()
        self.headers = {"Authorization": f"Bearer {token}"}
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.leases: list[tuple[str, str]] = []
        self.error: BaseException | None = None

    def call(self, http: httpx.Client, route: str, body: dict[str, Any]) -> httpx.Response:
        for _ in range(MAX_RETRIES):
            started = time.perf_counter()
            response = http.post(
                f"/job/{self.job_id}/chunks/{route}", json=body, headers=self.headers
            )
            self.latencies[route].append(time.perf_counter() - started)
            with self.lock:
                self.result.answers[(route, response.status_code)] += 1
            if response.status_code < 500:
                return response
            with self.lock:
                self.result.retried[route] += 1
            time.sleep(RETRY_PAUSE_SECONDS)
        raise RuntimeError(f"{route} kept failing: {response.status_code} {response.text[:200]}")

    def run(self) -> None:
        try:
            self.work()
        except Exception as error:  # noqa: BLE001 - run_load raises it in the main thread
            self.error = error

    def work(self) -> None:
        s3 = aws_client("s3", self.cluster.moto_url)
        identity = {"replica_id": self.replica_id}
        with httpx.Client(base_url=self.cluster.api_url, timeout=120) as http:
            while True:
                response = self.call(http, "pull", identity)
                if response.status_code == 204:
                    return
                assert response.status_code == 200, response.text
                lease = response.json()
                self.leases.append((lease["chunk_id"], lease["lease_token"]))
                lease_body = {
                    **identity,
                    "chunk_id": lease["chunk_id"],
                    "lease_token": lease["lease_token"],
                }
                renewed = self.call(http, "renew", lease_body)
                assert renewed.status_code == 200, renewed.text
                data = s3.get_object(
                    Bucket=lease["input_bucket"],
                    Key=lease["input_key"],
                    Range=f"bytes={lease['byte_start']}-{lease['byte_end'] - 1}",
                )["Body"].read()
                records = [
                    {
                        "id": f"batch_req_{json.loads(line)['custom_id']}",
                        "custom_id": json.loads(line)["custom_id"],
                        "response": {"status_code": 200, "body": {"choices": []}},
                        "error": None,
                    }
                    for line in data.splitlines()
                ]
                s3.put_object(
                    Bucket=lease["output_bucket"],
                    Key=lease["output_key"],
                    Body=b"".join(json.dumps(r).encode() + b"\n" for r in records),
                )
                completed = self.call(
                    http,
                    "complete",
                    {
                        **lease_body,
                        "output_key": lease["output_key"],
                        "requests_succeeded": len(records),
                    },
                )
                assert completed.status_code == 200, completed.text
                with self.lock:
                    self.result.completions[completed.json()["status"]] += 1


def run_load(num_chunks: int, num_replicas: int, name: str = "load") -> tuple[LoadResult, Cluster]:
    """Runs the load against a fresh cluster, which the caller stops; returns what was measured."""
    cluster = Cluster(name, lease_seconds=3600, watchdog_seconds=10).start()

    ids = [f"load-{i:06d}" for i in range(num_chunks)]
    bucket = cluster.environment()["TANDEMN_BUCKET"]
    key = f"inputs/{name}.jsonl"
    cluster.s3().put_object(Bucket=bucket, Key=key, Body=_input_lines(ids))
    client = cluster.client()
    client._http.timeout = httpx.Timeout(600.0)
    submitted = client.post(
        "/submit/batch",
        {"model_name": "bench/model", "input_file": f"s3://{bucket}/{key}", "chunk_size": 1},
    )
    job_id = submitted["job_id"]

    tokens: dict[str, str] = {}
    while len(tokens) < num_replicas:
        tokens.update(cluster.add_replicas(job_id, min(256, num_replicas - len(tokens))))

    result = LoadResult(job_id, ids, 0.0, defaultdict(list), defaultdict(list), Counter())
    threads = [Replica(cluster, job_id, rid, token, result) for rid, token in tokens.items()]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - started

    for thread in threads:
        if thread.error is not None:
            raise RuntimeError(f"replica {thread.replica_id} failed") from thread.error
        for route, values in thread.latencies.items():
            result.latencies[route].extend(values)
        for chunk_id, token in thread.leases:
            result.leases[chunk_id].append(token)
    return result, cluster


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=20_000, help="chunks of one request each")
    parser.add_argument("--replicas", type=int, default=64, help="concurrent replica threads")
    parser.add_argument(
        "--assembly-timeout", type=float, default=1800, help="seconds to wait for the output"
    )
    arguments = parser.parse_args()
    print(machine_line())
    result, cluster = run_load(arguments.chunks, arguments.replicas)
    try:
        print(
            f"{arguments.replicas} replicas, {arguments.chunks} chunks: {result.pulls} leases in "
            f"{result.seconds:.1f} s = {result.pulls / result.seconds:.1f} pulls/s, "
            f"{result.completions['completed'] / result.seconds:.1f} completions/s"
        )
        print(
            f"{'route':>9} {'calls':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'5xx retried':>12}"
        )
        for route in ROUTES:
            p50, p95, p99 = result.quantiles(route)
            calls = len(result.latencies[route])
            print(
                f"{route:>9} {calls:>7} {p50:>8.1f} {p95:>8.1f} {p99:>8.1f} {result.retried[route]:>12}"
            )
        print(f"answers: {dict(sorted((f'{r} {s}', n) for (r, s), n in result.answers.items()))}")
        print(f"double assignments: {len(result.double_assignments)}")
        lost = arguments.chunks - result.completions["completed"]
        print(f"chunks completed: {result.completions['completed']}, lost: {lost}")
        started = time.perf_counter()
        cluster.wait_for_job(result.job_id, arguments.assembly_timeout)
        print(f"assembly took {time.perf_counter() - started:.1f} s after the last completion")
        check_job_invariants(cluster.moto_url, result.job_id, result.input_ids)
        print("invariants hold: every custom_id once, counters equal the chunk items")
    finally:
        cluster.stop()
    return 0 if not result.double_assignments and lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
