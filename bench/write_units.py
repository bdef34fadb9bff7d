"""DynamoDB requests and request units per chunk lifecycle step and per metrics snapshot.

Runs the app in-process under moto and meters every DynamoDB call the app's client makes:

- requests, counted with botocore events, as ``bench/chunk_ops.py`` does;
- write request units (WRU) and read request units (RRU), computed from item sizes, because moto
  5.2.5 does not measure them. With ``ReturnConsumedCapacity=TOTAL`` it returns a constant (1.0
  per write, 0.5 per read, whatever the size), and an empty list for TransactWriteItems.

Item sizes follow "DynamoDB item sizes and formats"
(https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/CapacityUnitCalculations.html).
An item's size is the UTF-8 length of its attribute names plus the sizes of its values. A string
counts its UTF-8 length, a number 1 byte per two significant digits plus 1, a boolean or null 1
byte, and a list or map 3 bytes plus 1 per element. The units follow the on-demand pricing page
(https://aws.amazon.com/dynamodb/pricing/on-demand/). A write costs 1 WRU per started 1 KB, and
a transactional write twice that. A strongly consistent read costs 1 RRU per started 4 KB, and
an eventually consistent one half that. The script sizes a write by the larger of the item
before and after it, and rounds a Query once, after adding up the items it reads. Each global secondary index that a write
touches costs writes of the projected item: a put when the item enters the index, a delete
when it leaves, both when the index key changes, one update when only projected attributes
change. The before and after images come from a second, unmetered client that reads the item
around each metered call.

NOTE: two of these are assumptions, both on the side of a higher cost. A ConditionCheck in a
transaction is costed as a transactional write of the checked item. Index writes that a
transaction causes are costed as standard writes.

Run: ``python bench/write_units.py``. Scenarios: pull, renew and complete of jobs of 10 and of
10,000 chunks (the target: at most 3 requests each, none that grows with the job), one metrics
snapshot from a replica with 8 GPUs, built by the sidecar from real vLLM ``/metrics`` pages;
one heartbeat; the submission and the teardown of whole jobs of 10 and of 40 chunks.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from _harness import PROJECT_DIR, machine_line, use_test_stage

use_test_stage()
# The app logs every lease and completion at INFO; the figures are what this prints.
os.environ["POWERTOOLS_LOG_LEVEL"] = "WARNING"

import boto3
from chalice.test import Client
from moto import mock_aws

from chalicelib import aws, replicas
from chalicelib.config import load_settings
from tandemn.resources import create_resources

# A catalog model, so the job item carries the solver's placements as a real job's does.
MODEL_NAME = "meta-llama/Llama-3.1-70B-Instruct"
# The 10-chunk job has room for one warm-up pull plus this many.
SAMPLES = 8
SNAPSHOT_SAMPLES = 6
GPUS_PER_REPLICA = 8
WRITE_UNIT_BYTES = 1024
READ_UNIT_BYTES = 4096
TARGET_REQUESTS = 3
# Chunk counts of the two whole jobs metered for per-job costs; cost.py fits a line through them.
JOB_SIZES = (10, 40)
_WRITE_KINDS = ("Put", "Update", "Delete", "ConditionCheck")


# Item sizes.


def number_size(text: str) -> int:
    """Bytes DynamoDB counts for a number: 1 per two significant digits, plus 1."""
    digits = Decimal(text).normalize().as_tuple().digits
    significant = len(digits) if any(digits) else 1
    return (significant + 1) // 2 + 1


def value_size(value: dict[str, Any]) -> int:
    ((kind, inner),) = value.items()
    if kind == "S":
        return len(inner.encode())
    if kind == "N":
        return number_size(inner)
    if kind == "B":
        return len(inner)
    if kind in ("BOOL", "NULL"):
        return 1
    if kind == "SS":
        return sum(len(element.encode()) for element in inner)
    if kind == "NS":
        return sum(number_size(element) for element in inner)
    if kind == "BS":
        return sum(len(element) for element in inner)
    if kind == "L":
        return 3 + sum(1 + value_size(element) for element in inner)
    if kind == "M":
        return 3 + sum(len(name.encode()) + 1 + value_size(v) for name, v in inner.items())
    raise ValueError(f"unknown DynamoDB attribute type {kind!r}")


def item_size(item: dict[str, Any] | None) -> int:
    if not item:
        return 0
    return sum(len(name.encode()) + value_size(value) for name, value in item.items())


def write_units(size: int) -> int:
    return max(1, math.ceil(size / WRITE_UNIT_BYTES))


def read_units(size: int, consistent: bool) -> float:
    units = max(1, math.ceil(size / READ_UNIT_BYTES))
    return units if consistent else units / 2


# Metering.


@dataclass
class Usage:
    requests: collections.Counter[str] = field(default_factory=collections.Counter)
    wru: float = 0.0
    rru: float = 0.0
    # Write units by table, index writes included.
    wru_by_table: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    def add(self, other: Usage) -> None:
        self.requests.update(other.requests)
        self.wru += other.wru
        self.rru += other.rru
        self.wru_by_table.update(other.wru_by_table)


@dataclass(frozen=True)
class _Index:
    name: str
    keys: tuple[str, ...]
    projection: str
    included: tuple[str, ...]


class DynamoMeter:
    """Meters the requests of one boto3 DynamoDB client and computes their request units."""

    def __init__(self, metered: Any, reader: Any) -> None:
        self.reader = reader
        self.usage = Usage()
        self._schemas: dict[str, tuple[tuple[str, ...], tuple[_Index, ...]]] = {}
        self._pending: list[tuple[str, str, dict[str, Any], dict[str, Any] | None, bool]] = []
        self._params: dict[str, Any] = {}
        metered.meta.events.register("before-parameter-build.dynamodb", self._before)
        metered.meta.events.register("after-call.dynamodb", self._after)

    def take(self) -> Usage:
        taken, self.usage = self.usage, Usage()
        return taken

    def _schema(self, table: str) -> tuple[tuple[str, ...], tuple[_Index, ...]]:
        found = self._schemas.get(table)
        if found is None:
            description = self.reader.describe_table(TableName=table)["Table"]
            keys = tuple(k["AttributeName"] for k in description["KeySchema"])
            indexes = tuple(
                _Index(
                    index["IndexName"],
                    tuple(k["AttributeName"] for k in index["KeySchema"]),
                    index["Projection"]["ProjectionType"],
                    tuple(index["Projection"].get("NonKeyAttributes", ())),
                )
                for index in description.get("GlobalSecondaryIndexes", [])
            )
            found = self._schemas[table] = (keys, indexes)
        return found

    def _read(self, table: str, key: dict[str, Any]) -> dict[str, Any] | None:
        return self.reader.get_item(TableName=table, Key=key, ConsistentRead=True).get("Item")

    def _targets(self, operation: str, params: dict[str, Any]) -> list[tuple[str, str, dict, bool]]:
        """Returns (kind, table, key, transactional) of each item a write request touches."""
        targets = []
        if operation == "TransactWriteItems":
            for entry in params["TransactItems"]:
                ((kind, body),) = entry.items()
                targets.append((kind, body["TableName"], self._key_of(body), True))
        elif operation in ("PutItem", "UpdateItem", "DeleteItem"):
            kind = operation[: -len("Item")]
            targets.append((kind, params["TableName"], self._key_of(params), False))
        elif operation == "BatchWriteItem":
            for table, requests in params["RequestItems"].items():
                for request in requests:
                    ((kind, body),) = request.items()
                    kind = "Put" if kind == "PutRequest" else "Delete"
                    targets.append((kind, table, self._key_of({"TableName": table, **body}), False))
        return targets

    def _key_of(self, body: dict[str, Any]) -> dict[str, Any]:
        if "Key" in body:
            return body["Key"]
        keys, _ = self._schema(body["TableName"])
        return {name: body["Item"][name] for name in keys}

    def _before(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        self._params = params
        self._pending = [
            (kind, table, key, self._read(table, key), transactional)
            for kind, table, key, transactional in self._targets(model.name, params)
        ]

    def _after(self, model: Any, parsed: dict[str, Any], **_: Any) -> None:
        operation = model.name
        self.usage.requests[operation] += 1
        if operation in ("GetItem",):
            size = item_size(parsed.get("Item"))
            self.usage.rru += read_units(size, bool(self._params.get("ConsistentRead")))
        elif operation in ("Query", "Scan"):
            # NOTE: items cut by a ProjectionExpression count at their returned size, so a
            # projected Query is under-counted here.
            size = sum(item_size(item) for item in parsed.get("Items", []))
            self.usage.rru += read_units(size, bool(self._params.get("ConsistentRead")))
        for kind, table, key, before, transactional in self._pending:
            after = self._read(table, key)
            size = max(item_size(before), item_size(after))
            units = write_units(size) * (2 if transactional else 1)
            if kind != "ConditionCheck":
                units += self._index_units(table, before, after)
            self.usage.wru += units
            self.usage.wru_by_table[table] += units
        self._pending = []

    def _index_units(self, table: str, before: dict | None, after: dict | None) -> int:
        keys, indexes = self._schema(table)
        units = 0
        for index in indexes:
            old = self._projected(index, keys, before)
            new = self._projected(index, keys, after)
            if old is None and new is None:
                continue
            if old is None or new is None:
                units += write_units(item_size(old or new))
                continue
            if any(old.get(name) != new.get(name) for name in index.keys):
                units += write_units(item_size(old)) + write_units(item_size(new))
            elif old != new:
                units += write_units(max(item_size(old), item_size(new)))
        return units

    @staticmethod
    def _projected(index: _Index, keys: tuple[str, ...], item: dict | None) -> dict | None:
        if not item or any(name not in item for name in index.keys):
            return None
        if index.projection == "ALL":
            return dict(item)
        names = set(keys) | set(index.keys)
        if index.projection == "INCLUDE":
            names |= set(index.included)
        return {name: value for name, value in item.items() if name in names}


class S3Meter:
    """Counts the requests of one boto3 S3 client by operation."""

    def __init__(self, metered: Any) -> None:
        self.requests: collections.Counter[str] = collections.Counter()
        metered.meta.events.register("after-call.s3", self._after)

    def _after(self, model: Any, **_: Any) -> None:
        self.requests[model.name] += 1

    def take(self) -> collections.Counter[str]:
        taken, self.requests = self.requests, collections.Counter()
        return taken


# Scenarios.


def _post(client: Client, path: str, body: dict[str, Any], token: str | None = None) -> Any:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    response = client.http.post(path, headers=headers, body=json.dumps(body).encode())
    assert response.status_code in (200, 204), (path, response.status_code, response.body)
    return response


def _input_lines(count: int) -> bytes:
    lines = []
    for i in range(count):
        record = {
            "custom_id": f"request-{i:07d}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "messages": [{"role": "user", "content": f"Explain continuous batching. {i}"}],
                "max_tokens": 300,
            },
        }
        lines.append(json.dumps(record).encode() + b"\n")
    return b"".join(lines)


@dataclass
class Stack:
    client: Client
    settings: Any
    s3: Any
    dynamo_meter: DynamoMeter
    s3_meter: S3Meter

    def take(self) -> tuple[Usage, collections.Counter[str]]:
        return self.dynamo_meter.take(), self.s3_meter.take()


def open_stack(client: Client) -> Stack:
    """Creates the tables and bucket and meters the app's clients; call inside ``mock_aws``."""
    aws.reset_clients()
    replicas.clear_auth_cache()
    settings = load_settings()
    dynamodb, s3 = aws.client("dynamodb"), aws.client("s3")
    create_resources(dynamodb, s3, settings)
    reader = boto3.session.Session().client("dynamodb", region_name=settings.region)
    return Stack(client, settings, s3, DynamoMeter(dynamodb, reader), S3Meter(s3))


def submit(stack: Stack, num_requests: int, chunk_size: int) -> tuple[str, str, str]:
    """Submits a job and registers one replica; returns (job id, replica id, token)."""
    key = "inputs/bench.jsonl"
    stack.s3.put_object(Bucket=stack.settings.bucket, Key=key, Body=_input_lines(num_requests))
    # The upload is the user's, not the control plane's.
    stack.take()
    body = {
        "model_name": MODEL_NAME,
        "input_file": f"s3://{stack.settings.bucket}/{key}",
        "chunk_size": chunk_size,
        "slo_deadline_hours": 24,
    }
    job_id = _post(stack.client, "/submit/batch", body).json_body["job_id"]
    scaled = _post(stack.client, f"/job/{job_id}/scale", {"count": 1}).json_body
    ((replica_id, token),) = scaled["replica_tokens"].items()
    return job_id, replica_id, token


def chunk_lifecycle(num_chunks: int) -> tuple[dict[str, list[Usage]], int]:
    """Meters SAMPLES pulls, renews and completes of a job with ``num_chunks`` chunks.

    Returns the usage of each step and the job item's size in bytes.
    """
    with mock_aws():
        from app import app

        with Client(app, stage_name="test", project_dir=str(PROJECT_DIR)) as client:
            stack = open_stack(client)
            job_id, replica_id, token = submit(stack, num_chunks, chunk_size=1)
            pull_path = f"/job/{job_id}/chunks/pull"
            # Warm the token cache, as a running replica's Lambda container is.
            leases = [_post(client, pull_path, {"replica_id": replica_id}, token).json_body]
            stack.take()
            usage: dict[str, list[Usage]] = {"pull": [], "renew": [], "complete": []}
            for _ in range(SAMPLES):
                leases.append(_post(client, pull_path, {"replica_id": replica_id}, token).json_body)
                usage["pull"].append(stack.take()[0])
            for lease in leases[:SAMPLES]:
                body = {
                    "replica_id": replica_id,
                    "chunk_id": lease["chunk_id"],
                    "lease_token": lease["lease_token"],
                }
                _post(client, f"/job/{job_id}/chunks/renew", body, token)
                usage["renew"].append(stack.take()[0])
            for lease in leases[:SAMPLES]:
                stack.s3.put_object(
                    Bucket=stack.settings.bucket, Key=lease["output_key"], Body=b"{}\n"
                )
                stack.take()
                body = {
                    "replica_id": replica_id,
                    "chunk_id": lease["chunk_id"],
                    "lease_token": lease["lease_token"],
                    "output_key": lease["output_key"],
                    "requests_succeeded": 1,
                    "generation_tokens": 300,
                    "prompt_tokens": 800,
                }
                _post(client, f"/job/{job_id}/chunks/complete", body, token)
                usage["complete"].append(stack.take()[0])
            job_key = {"job_id": {"S": job_id}}
            job_item = stack.dynamo_meter._read(stack.settings.jobs_table, job_key)
            return usage, item_size(job_item)


def job_overhead(num_chunks: int) -> dict[str, Any]:
    """Meters a whole job of ``num_chunks`` one-request chunks: submission, then teardown.

    The test stage runs the teardown (assembly, run report) inline, inside the request that
    completes the last chunk. Its usage is that request's usage less the median completion's.
    """
    with mock_aws():
        from app import app

        with Client(app, stage_name="test", project_dir=str(PROJECT_DIR)) as client:
            stack = open_stack(client)
            job_id, replica_id, token = submit(stack, num_chunks, chunk_size=1)
            submission, submission_s3 = stack.take()
            completions: list[tuple[Usage, collections.Counter[str]]] = []
            for _ in range(num_chunks):
                lease = _post(
                    client, f"/job/{job_id}/chunks/pull", {"replica_id": replica_id}, token
                ).json_body
                # With chunk_size 1, chunk i contains request i.
                custom_id = f"request-{lease['chunk_index']:07d}"
                line = json.dumps({"custom_id": custom_id, "response": {"status_code": 200}})
                stack.s3.put_object(
                    Bucket=stack.settings.bucket, Key=lease["output_key"], Body=line.encode()
                )
                stack.take()
                body = {
                    "replica_id": replica_id,
                    "chunk_id": lease["chunk_id"],
                    "lease_token": lease["lease_token"],
                    "output_key": lease["output_key"],
                }
                _post(client, f"/job/{job_id}/chunks/complete", body, token)
                completions.append(stack.take())
            (last, last_s3), earlier = completions[-1], completions[:-1]
            usual, usual_s3 = sorted(earlier, key=lambda c: c[0].wru)[len(earlier) // 2]
            teardown = Usage(
                collections.Counter(last.requests),
                last.wru - usual.wru,
                last.rru - usual.rru,
                collections.Counter(last.wru_by_table),
            )
            teardown.requests.subtract(usual.requests)
            teardown.wru_by_table.subtract(usual.wru_by_table)
            last_s3.subtract(usual_s3)
            return {
                "submission": summarize([submission]),
                "submission_s3": dict(submission_s3),
                "teardown": summarize([teardown]),
                "teardown_s3": {name: n for name, n in last_s3.items() if n},
            }


def _gpu_reading() -> dict[str, Any]:
    per_gpu: dict[str, float] = {}
    for index in range(GPUS_PER_REPLICA):
        per_gpu[f"gpu{index}_sm_pct"] = 93.0 + index / 10
        per_gpu[f"gpu{index}_membw_pct"] = 71.0 + index / 10
        per_gpu[f"gpu{index}_mem_gb"] = 38.21 + index / 100
        per_gpu[f"gpu{index}_mem_pct"] = 93.3
    return {"gpu_sm_util_pct": 93.4, "gpu_mem_bw_util_pct": 71.4, "per_gpu": per_gpu}


def replica_reports() -> tuple[list[Usage], int, list[Usage]]:
    """Meters SNAPSHOT_SAMPLES metric ingests of one snapshot each, then as many heartbeats.

    Returns the ingests' usage, the ingest body's size in bytes and the heartbeats' usage.
    """
    from sidecar.telemetry import ClientMetrics, SnapshotBuilder, combine, parse_engine_metrics

    pages = [
        (PROJECT_DIR / "tests" / "fixtures" / f"vllm_v1_{name}.txt").read_text()
        for name in ("before", "after")
    ]
    with mock_aws():
        from app import app

        with Client(app, stage_name="test", project_dir=str(PROJECT_DIR)) as client:
            stack = open_stack(client)
            job_id, replica_id, token = submit(stack, 10, chunk_size=1)
            builder = SnapshotBuilder()
            path = f"/job/{job_id}/metrics/ingest"
            usage, body_bytes = [], 0
            for seq in range(SNAPSHOT_SAMPLES + 1):
                reading, mode = combine(
                    parse_engine_metrics(pages[seq % 2]), ClientMetrics().reading()
                )
                snapshot = builder.build(reading, mode, _gpu_reading(), 1.8e9 + 5.0 * seq)
                body = {
                    "replica_id": replica_id,
                    "session": builder.session,
                    "snapshots": [snapshot],
                }
                body_bytes = len(json.dumps(body))
                _post(client, path, body, token)
                # The first ingest creates the state item; later ones are the steady state.
                if seq:
                    usage.append(stack.take()[0])
                else:
                    stack.take()
            heartbeats = []
            for _ in range(SNAPSHOT_SAMPLES):
                _post(client, f"/job/{job_id}/heartbeat", {"replica_id": replica_id}, token)
                heartbeats.append(stack.take()[0])
            return usage, body_bytes, heartbeats


# Report.


def summarize(samples: list[Usage]) -> dict[str, Any]:
    operations: collections.Counter[str] = collections.Counter()
    by_table: collections.Counter[str] = collections.Counter()
    for sample in samples:
        operations.update(sample.requests)
        by_table.update(sample.wru_by_table)
    count = len(samples)
    return {
        "requests": statistics.mean(s.total_requests for s in samples),
        "max_requests": max(s.total_requests for s in samples),
        "wru": statistics.mean(s.wru for s in samples),
        "rru": statistics.mean(s.rru for s in samples),
        "operations": {name: n / count for name, n in sorted(operations.items()) if n},
        "wru_by_table": {name: n / count for name, n in sorted(by_table.items()) if n},
    }


def measure_all() -> dict[str, Any]:
    """Runs every scenario; returns per-operation summaries (used by bench/cost.py too)."""
    lifecycle, job_item_bytes = {}, 0
    for num_chunks in (10, 10_000):
        usage, job_item_bytes = chunk_lifecycle(num_chunks)
        lifecycle[num_chunks] = {step: summarize(samples) for step, samples in usage.items()}
    snapshots, body_bytes, heartbeats = replica_reports()
    return {
        "lifecycle": lifecycle,
        "job_item_bytes": job_item_bytes,
        "snapshot": summarize(snapshots),
        "snapshot_body_bytes": body_bytes,
        "heartbeat": summarize(heartbeats),
        "jobs": {n: job_overhead(n) for n in JOB_SIZES},
    }


def _operations_text(summary: dict[str, Any]) -> str:
    operations = ", ".join(f"{name} {n:g}" for name, n in summary["operations"].items())
    tables = ", ".join(
        f"{name.removeprefix('tandemn-')} {n:g}" for name, n in summary["wru_by_table"].items()
    )
    return f"{operations}; WRU by table: {tables}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures here (bench/cost.py)")
    args = parser.parse_args()

    print(machine_line())
    print("request units computed from item sizes (moto reports no real consumed capacity)")
    results = measure_all()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{'chunks':>7} {'step':<9} {'requests':>8} {'max':>4} {'WRU':>6} {'RRU':>5}  operations")
    ok = True
    for num_chunks, steps in results["lifecycle"].items():
        for step, summary in steps.items():
            ok &= summary["max_requests"] <= TARGET_REQUESTS
            print(
                f"{num_chunks:>7} {step:<9} {summary['requests']:>8.2f} {summary['max_requests']:>4}"
                f" {summary['wru']:>6.2f} {summary['rru']:>5.2f}  {_operations_text(summary)}"
            )

    small, large = results["lifecycle"][10], results["lifecycle"][10_000]
    same = all(small[s]["requests"] == large[s]["requests"] for s in small)
    snapshot = results["snapshot"]
    print(
        f"metrics snapshot (one per ingest, {GPUS_PER_REPLICA} GPUs, body "
        f"{results['snapshot_body_bytes']} bytes): {snapshot['requests']:.2f} requests, "
        f"{snapshot['wru']:.2f} WRU, {snapshot['rru']:.2f} RRU  ({_operations_text(snapshot)})"
    )

    heartbeat = results["heartbeat"]
    print(
        f"heartbeat: {heartbeat['requests']:.2f} requests, {heartbeat['wru']:.2f} WRU, "
        f"{heartbeat['rru']:.2f} RRU  ({_operations_text(heartbeat)})"
    )
    print(f"job item: {results['job_item_bytes']} bytes (it carries the ranked placements)")
    for num_chunks, job in results["jobs"].items():
        for phase in ("submission", "teardown"):
            summary = job[phase]
            s3 = ", ".join(f"{name} {n}" for name, n in sorted(job[f"{phase}_s3"].items()))
            print(
                f"job of {num_chunks} chunks, {phase}: {summary['requests']:.0f} requests, "
                f"{summary['wru']:.0f} WRU, {summary['rru']:.1f} RRU ({_operations_text(summary)})"
                f"; S3: {s3}"
            )
    print(
        f"requests equal at 10 and 10,000 chunks: {same}; at most {TARGET_REQUESTS} per step: {ok}"
    )
    return 0 if same and ok else 1


if __name__ == "__main__":
    sys.exit(main())
