"""Engine-slot utilisation of the sidecar across chunk boundaries, pipelined versus finish-then-pull.

A simulated engine on 127.0.0.1 (``sidecar.fakes.FakeEngine``) has a fixed number of slots, and
each request occupies a slot for ``max_tokens * ms_per_token`` ms. Request lengths vary (seeded), so
chunk tails are uneven. A fake control plane serves the chunks from an in-memory queue, and S3 is
a moto server on 127.0.0.1. Both variants run in one process on the same workload:

    utilisation = busy slot-seconds / (slots * (last request end - first request start))

Run: ``python bench/saturation.py`` (about 40 s with the defaults).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# S3 must go to the local moto server only, with fake credentials and no instance metadata.
os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCOUNT_ID_ENDPOINT_MODE": "disabled",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
)

import boto3
from moto.server import ThreadedMotoServer

from sidecar.control import ControlPlaneClient
from sidecar.engine import EngineClient
from sidecar.fakes import FakeControlPlane, FakeEngine, split_into_leases
from sidecar.runner import Runner
from sidecar.storage import ChunkStorage

JOB_ID = "job-bench"
REPLICA_ID = "replica-bench"
TOKEN = "trk_bench-token-0123456789abcdef"
BUCKET = "saturation-bench"
INPUT_KEY = "inputs/batch.jsonl"


def build_input(requests: int, min_tokens: int, max_tokens: int, seed: int) -> bytes:
    rng = random.Random(seed)
    lines = []
    for number in range(requests):
        body = {
            "model": "bench",
            "messages": [{"role": "user", "content": f"request {number}"}],
            "max_tokens": rng.randint(min_tokens, max_tokens),
        }
        line = {"custom_id": f"req-{number:05d}", "method": "POST", "url": "/v1/chat/completions"}
        lines.append(json.dumps({**line, "body": body}).encode() + b"\n")
    return b"".join(lines)


def utilisation(intervals: list[tuple[float, float]], slots: int) -> tuple[float, float]:
    """Return (utilisation, wall seconds from the first slot start to the last slot end)."""
    first = min(start for start, _ in intervals)
    last = max(end for _, end in intervals)
    busy = sum(end - start for start, end in intervals)
    wall = last - first
    return busy / (slots * wall), wall


async def run_variant(
    control: FakeControlPlane, engine: FakeEngine, concurrency: int, pipeline: bool
) -> Runner:
    control_client = ControlPlaneClient(control.url, JOB_ID, REPLICA_ID, TOKEN)
    engine_client = EngineClient(engine.url, concurrency=concurrency)
    runner = Runner(
        control_client,
        engine_client,
        ChunkStorage(),
        concurrency=concurrency,
        pipeline=pipeline,
        poll_interval=0.05,
        health_poll_interval=0.05,
    )
    try:
        code = await runner.run()
    finally:
        await control_client.aclose()
        await engine_client.aclose()
    if code != 0:
        raise RuntimeError(f"sidecar exited with code {code}")
    return runner


def measure(
    arguments: argparse.Namespace, data: bytes, etag: str, engine: FakeEngine, pipeline: bool
) -> tuple[float, float]:
    leases = split_into_leases(
        JOB_ID,
        data,
        arguments.chunk_size,
        input_bucket=BUCKET,
        input_key=INPUT_KEY,
        output_bucket=BUCKET,
        input_etag=etag,
    )
    control = FakeControlPlane(job_id=JOB_ID, token=TOKEN, leases=leases).start()
    engine.reset()
    try:
        runner = asyncio.run(run_variant(control, engine, arguments.slots, pipeline))
    finally:
        control.stop()
    expected = arguments.chunks * arguments.chunk_size
    if runner.stats.requests_succeeded != expected or len(control.completed) != arguments.chunks:
        raise RuntimeError(
            f"run incomplete: {runner.stats.requests_succeeded} of {expected} requests, "
            f"{len(control.completed)} of {arguments.chunks} chunks"
        )
    return utilisation(engine.busy_intervals(), arguments.slots)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=40, help="chunks in the job; default 40")
    parser.add_argument("--chunk-size", type=int, default=16, help="requests per chunk; default 16")
    parser.add_argument(
        "--slots", type=int, default=8, help="engine slots, also the sidecar concurrency; default 8"
    )
    parser.add_argument(
        "--ms-per-token",
        type=float,
        default=1.0,
        help="service time per output token, ms; default 1",
    )
    parser.add_argument(
        "--min-tokens", type=int, default=50, help="minimum max_tokens of a request; default 50"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=350, help="maximum max_tokens of a request; default 350"
    )
    parser.add_argument(
        "--seed", type=int, default=7, help="random seed of the request lengths; default 7"
    )
    arguments = parser.parse_args()

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    load_at_start = os.getloadavg()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    engine = FakeEngine(slots=arguments.slots, ms_per_token=arguments.ms_per_token).start()
    try:
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        requests = arguments.chunks * arguments.chunk_size
        data = build_input(requests, arguments.min_tokens, arguments.max_tokens, arguments.seed)
        etag = s3.put_object(Bucket=BUCKET, Key=INPUT_KEY, Body=data)["ETag"]

        started = time.monotonic()
        pipelined, pipelined_wall = measure(arguments, data, etag, engine, pipeline=True)
        baseline, baseline_wall = measure(arguments, data, etag, engine, pipeline=False)
        total = time.monotonic() - started
    finally:
        engine.stop()
        moto.stop()

    print(f"date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}")
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    # Other processes compete for the CPUs with the simulated engine and the sidecar.
    print(f"load average at start (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in load_at_start)}")
    print(
        f"workload: {arguments.chunks} chunks x {arguments.chunk_size} requests, "
        f"{arguments.slots} engine slots, sidecar concurrency {arguments.slots}, "
        f"{arguments.ms_per_token:g} ms per token, max_tokens {arguments.min_tokens}-"
        f"{arguments.max_tokens} (seed {arguments.seed})"
    )
    print(f"pipelined utilisation: {pipelined:.4f} (wall {pipelined_wall:.2f} s)")
    print(f"finish-then-pull utilisation: {baseline:.4f} (wall {baseline_wall:.2f} s)")
    print(f"ratio pipelined / finish-then-pull: {pipelined / baseline:.3f}")
    print(f"benchmark time: {total:.1f} s")


if __name__ == "__main__":
    main()
