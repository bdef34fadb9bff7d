"""Tokens per second through the whole local stack against the same engine driven directly.

Both runs use llama.cpp's llama-server with SmolLM2-135M-Instruct, the same prompts, the same
max_tokens and the same concurrency (the engine's slot count). The direct run sends the requests
with httpx from this process. The stack run submits them as a job to `tandemn local up` with one
replica; its window runs from the first chunk lease to the job's end (output assembled), so it
counts every control-plane step a user waits for except the engine's start-up, which the direct
run does not pay either. Direct runs alternate with stack runs (one before each and one after
the last), because the machine's speed drifts; the ratio is median over median.

Run: ``python bench/local_e2e.py [--requests 48] [--max-tokens 64] [--slots 4]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _harness import PROJECT_DIR, machine_line

sys.path.insert(0, str(PROJECT_DIR))

from tandemn import engine_paths
from tandemn.api_client import ApiClient
from tandemn.local_provider import free_port
from tandemn.stack_process import StackProcess
from tests.localstack_support import wait_for_job

# Both runs give the engine the same CPU threads; one replica runs, so it may use every core.
THREADS = os.cpu_count() or 2
TOPICS = ["the sea", "a forest", "a city at night", "a mountain", "the desert", "a river", "winter", "a library"]


def prompts(count: int) -> list[str]:
    return [f"Write two sentences about {TOPICS[i % len(TOPICS)]}. Variant {i}." for i in range(count)]


async def drive_directly(url: str, texts: list[str], max_tokens: int, concurrency: int) -> tuple[int, float]:
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def one(text: str) -> int:
            async with semaphore:
                body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}
                response = await client.post("/v1/chat/completions", json=body)
                response.raise_for_status()
                return response.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        tokens = await asyncio.gather(*(one(t) for t in texts))
        return sum(tokens), time.perf_counter() - started


def run_direct(texts: list[str], max_tokens: int, slots: int, context_per_slot: int) -> float:
    binary, model = engine_paths.find_engine()
    port = free_port()
    engine = subprocess.Popen(
        [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--parallel", str(slots),
         "--ctx-size", str(slots * context_per_slot), "--threads", str(THREADS), "--no-webui"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        tokens, seconds = asyncio.run(drive_directly(f"http://127.0.0.1:{port}", texts, max_tokens, slots))
    finally:
        engine.terminate()
        engine.wait(timeout=10)
    return tokens / seconds


def run_stack(texts: list[str], max_tokens: int, slots: int, chunk_size: int) -> tuple[float, dict]:
    lines = [
        json.dumps({"custom_id": f"b-{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"messages": [{"role": "user", "content": t}], "max_tokens": max_tokens}})
        for i, t in enumerate(texts)
    ]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.jsonl"
        path.write_text("\n".join(lines) + "\n")
        stack = StackProcess(
            "--engine", "llama", "--slots", str(slots), "--engine-threads", str(THREADS),
            log_path=Path(folder) / "stack.log",
        )
        try:
            stack.wait_ready()
            client = ApiClient(stack.url)
            uri = client.upload(path)
            submitted = client.post(
                "/submit/batch",
                {"model_name": "HuggingFaceTB/SmolLM2-135M-Instruct", "input_file": uri, "replicas": 1, "chunk_size": chunk_size},
            )
            job = wait_for_job(client, submitted["job_id"], timeout=900)
            first_lease = _first_lease_time(stack, submitted["job_id"])
            links = client.get(f"/job/{submitted['job_id']}/output")
            client.download(links["output_url"], Path(folder) / "output.jsonl")
            records = [json.loads(line) for line in (Path(folder) / "output.jsonl").read_text().splitlines()]
        finally:
            stack.stop()
    tokens = sum(r["response"]["body"]["usage"]["completion_tokens"] for r in records)
    window = job["finished_at"] - first_lease
    return tokens / window, {"requests": len(records), "tokens": tokens, "window_s": window}


def _first_lease_time(stack: StackProcess, job_id: str) -> float:
    import boto3

    dynamodb = boto3.client(
        "dynamodb",
        endpoint_url=f"http://127.0.0.1:{stack.port + 1}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    items = dynamodb.query(
        TableName="tandemn-chunks",
        KeyConditionExpression="job_id = :j",
        ExpressionAttributeValues={":j": {"S": job_id}},
    )["Items"]
    return min(float(item["leased_at"]["N"]) for item in items)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48, help="requests in the workload")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    parser.add_argument("--slots", type=int, default=4, help="engine slots = concurrency of both runs")
    parser.add_argument("--chunk-size", type=int, default=8, help="requests per chunk in the stack run")
    parser.add_argument("--rounds", type=int, default=3, help="stack runs, each between two direct runs")
    args = parser.parse_args()
    print(machine_line())
    texts = prompts(args.requests)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    direct = [run_direct(texts, args.max_tokens, args.slots, 2048)]
    stack = []
    for _ in range(args.rounds):
        rate, details = run_stack(texts, args.max_tokens, args.slots, args.chunk_size)
        stack.append(rate)
        print(
            f"stack run: {rate:.1f} tokens/s ({details['tokens']} tokens, "
            f"{details['requests']} requests, {details['window_s']:.1f} s)"
        )
        direct.append(run_direct(texts, args.max_tokens, args.slots, 2048))
    print("engine driven directly, tokens/s: " + ", ".join(f"{r:.1f}" for r in direct))
    print("through the local stack, tokens/s: " + ", ".join(f"{r:.1f}" for r in stack))
    ratio = statistics.median(stack) / statistics.median(direct)
    print(
        f"median stack {statistics.median(stack):.1f} / median direct "
        f"{statistics.median(direct):.1f} = ratio {ratio:.3f} (target at least 0.9), "
        f"concurrency {args.slots}"
    )
    return 0 if ratio >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
