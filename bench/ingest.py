"""Ingest rate and peak memory of submitting a 1,000,000-request input file.

Generates the file (about 400 MB), starts the local stack's moto server on 127.0.0.1, uploads
the file to its S3, then runs the submission path (stream, validate, create 1,000 chunks and the
job) in a child process against that server, and prints requests per second and the child's
peak RSS. The moto server, which holds the uploaded object, runs in its own process and is not
counted.

Run: ``python bench/ingest.py [--requests 1000000] [--chunk-size 1000]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import PROJECT_DIR, machine_line

sys.path.insert(0, str(PROJECT_DIR))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment(port: int) -> dict[str, str]:
    stage = json.loads((PROJECT_DIR / ".chalice" / "config.json").read_text())["stages"]["local"]
    environment = {**os.environ, **stage["environment_variables"]}
    environment["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    # Validate in the request path: the figure is the memory of one streaming pass.
    environment["TANDEMN_SYNC_VALIDATION_MAX_BYTES"] = str(4 * 1024**3)
    environment["TANDEMN_PROVIDER"] = "external"
    return environment


def child(uri: str, chunk_size: int) -> None:
    from chalicelib import submission
    from chalicelib.config import load_settings
    from chalicelib.models import SubmitBatchRequest

    started = time.perf_counter()
    request = SubmitBatchRequest(model_name="bench/model", input_file=uri, chunk_size=chunk_size)
    result = submission.submit(load_settings(), request)
    elapsed = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "seconds": elapsed,
                "chunks": result["chunks"],
                "requests": result["input_stats"]["num_lines"],
                "peak_kib": peak_kib,
            }
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests", type=int, default=1_000_000, help="requests in the generated file"
    )
    parser.add_argument("--chunk-size", type=int, default=1000, help="requests per chunk")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.chunk_size)
        return 0

    from bench.workloads import write_batch_file

    print(machine_line())
    port = _free_port()
    environment = _environment(port)
    moto = subprocess.Popen(
        [sys.executable, "-m", "tandemn.motoserver", "--port", str(port)],
        cwd=PROJECT_DIR,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "batch.jsonl"
            started = time.perf_counter()
            size = write_batch_file(path, args.requests)
            print(
                f"generated {args.requests} requests, {size / 1e6:.0f} MB in {time.perf_counter() - started:.1f} s"
            )
            os.environ.update(environment)
            from chalicelib import aws
            from chalicelib.config import load_settings
            from tandemn.resources import create_resources

            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.1)
            settings = load_settings()
            create_resources(aws.client("dynamodb"), aws.client("s3"), settings)
            aws.client("s3").upload_file(str(path), settings.bucket, "inputs/bench.jsonl")
            uri = f"s3://{settings.bucket}/inputs/bench.jsonl"
            output = subprocess.run(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--child",
                    uri,
                    "--chunk-size",
                    str(args.chunk_size),
                ],
                cwd=PROJECT_DIR,
                env=environment,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            figures = json.loads(output.strip().splitlines()[-1])
    finally:
        moto.terminate()
        moto.wait(timeout=10)
    rate = figures["requests"] / figures["seconds"]
    peak_mb = figures["peak_kib"] / 1024
    print(
        f"submitted {figures['requests']} requests in {figures['chunks']} chunks in {figures['seconds']:.1f} s"
    )
    print(f"ingest rate: {rate:,.0f} requests/s ({size / figures['seconds'] / 1e6:.1f} MB/s)")
    print(f"peak RSS of the submitting process: {peak_mb:.0f} MB (target under 300 MB)")
    return 0 if peak_mb < 300 else 1


if __name__ == "__main__":
    sys.exit(main())
