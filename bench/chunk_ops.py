"""Counts the DynamoDB requests each replica-facing chunk route makes.

Runs the app in-process under moto, counts requests with botocore's ``before-call`` events, and
prints requests per pull, per renew and per complete for a job of 10 chunks and one of 10,000.
The two rows must be equal (no request count grows with the job) and no ``Scan`` may appear.
Each replica's first request also reads its replica item to verify the token; the process then
caches the verified token, so the steady-state figures below exclude that one read.

Run: ``python bench/chunk_ops.py``
"""

from __future__ import annotations

import collections
import json
import sys

from _harness import PROJECT_DIR, machine_line, use_test_stage

use_test_stage()

from chalice.test import Client
from moto import mock_aws

from chalicelib import aws, replicas
from chalicelib.config import load_settings
from tandemn.resources import create_resources

# The 10-chunk job has room for one warm-up pull plus this many.
SAMPLES = 8


class RequestCounter:
    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.total_by_operation: collections.Counter[str] = collections.Counter()

    def __call__(self, model, **kwargs) -> None:
        self.calls[model.name] += 1
        self.total_by_operation[model.name] += 1

    def take(self) -> collections.Counter[str]:
        taken, self.calls = self.calls, collections.Counter()
        return taken


def _post(client, path, body, token=None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return client.http.post(path, headers=headers, body=json.dumps(body).encode())


def measure(num_chunks: int) -> dict[str, float]:
    with mock_aws():
        aws.reset_clients()
        replicas.clear_auth_cache()
        settings = load_settings()
        dynamodb = aws.client("dynamodb")
        s3 = aws.client("s3")
        create_resources(dynamodb, s3, settings)
        lines = b"".join(
            json.dumps(
                {
                    "custom_id": f"r{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                }
            ).encode()
            + b"\n"
            for i in range(num_chunks)
        )
        s3.put_object(Bucket=settings.bucket, Key="inputs/bench.jsonl", Body=lines)
        from app import app

        counter = RequestCounter()
        dynamodb.meta.events.register("before-call.dynamodb", counter)
        with Client(app, stage_name="test", project_dir=str(PROJECT_DIR)) as client:
            submitted = _post(
                client,
                "/submit/batch",
                {
                    "model_name": "bench/model",
                    "input_file": f"s3://{settings.bucket}/inputs/bench.jsonl",
                    "chunk_size": 1,
                },
            ).json_body
            job_id = submitted["job_id"]
            scaled = _post(client, f"/job/{job_id}/scale", {"count": 1}).json_body
            ((replica_id, token),) = scaled["replica_tokens"].items()
            # Warm the token cache, as a running replica's Lambda container is.
            warm = _post(
                client, f"/job/{job_id}/chunks/pull", {"replica_id": replica_id}, token
            ).json_body
            counter.take()

            per_operation: dict[str, list[int]] = {"pull": [], "renew": [], "complete": []}
            leases = [warm]
            for _ in range(SAMPLES):
                response = _post(
                    client, f"/job/{job_id}/chunks/pull", {"replica_id": replica_id}, token
                )
                assert response.status_code == 200, response.body
                per_operation["pull"].append(sum(counter.take().values()))
                leases.append(response.json_body)
            for lease in leases[:SAMPLES]:
                body = {
                    "replica_id": replica_id,
                    "chunk_id": lease["chunk_id"],
                    "lease_token": lease["lease_token"],
                }
                response = _post(client, f"/job/{job_id}/chunks/renew", body, token)
                assert response.status_code == 200, response.body
                per_operation["renew"].append(sum(counter.take().values()))
            for lease in leases[:SAMPLES]:
                s3.put_object(Bucket=settings.bucket, Key=lease["output_key"], Body=b"")
                counter.take()
                body = {
                    "replica_id": replica_id,
                    "chunk_id": lease["chunk_id"],
                    "lease_token": lease["lease_token"],
                    "output_key": lease["output_key"],
                }
                response = _post(client, f"/job/{job_id}/chunks/complete", body, token)
                assert response.status_code == 200, response.body
                per_operation["complete"].append(sum(counter.take().values()))
        scans = counter.total_by_operation.get("Scan", 0)
        result = {name: sum(values) / len(values) for name, values in per_operation.items()}
        result.update({f"{name}_max": max(values) for name, values in per_operation.items()})
        result["scans"] = scans
        return result


def main() -> int:
    print(machine_line())
    print(
        f"{'chunks':>8} {'pull':>6} {'renew':>6} {'complete':>9} {'max pull/renew/complete':>24} {'Scan':>5}"
    )
    rows = {}
    for num_chunks in (10, 10_000):
        row = measure(num_chunks)
        rows[num_chunks] = row
        print(
            f"{num_chunks:>8} {row['pull']:>6.2f} {row['renew']:>6.2f} {row['complete']:>9.2f} "
            f"{row['pull_max']:>10}/{row['renew_max']}/{row['complete_max']:<11} {row['scans']:>5}"
        )
    same = all(rows[10][k] == rows[10_000][k] for k in ("pull", "renew", "complete"))
    print(f"rows equal: {same}; Scan requests: {rows[10]['scans'] + rows[10_000]['scans']}")
    return 0 if same and rows[10]["scans"] == rows[10_000]["scans"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
