"""Control-plane AWS cost of one realistic job, against the job's GPU cost.

The job: Llama-3.1-70B on one p4d.24xlarge replica (8 x A100-40GB, tp_size 8, on-demand, price
from chalicelib/data/instances.json), 1,000,000 requests of 800 prompt and 300 output tokens,
chunk_size 1000. The placement solver (chalicelib/placement.py, roofline model) estimates the
replica's throughput and the job's runtime; the job's control-plane traffic follows from them:

- per chunk: one pull, one complete, and the renews while the lease is held (the sidecar renews
  every lease_seconds / 3). The sidecar's ranged S3 GET of the input and S3 PUT of the output,
  and the control plane's S3 HEAD of the output;
- per replica, for the whole runtime: a metrics snapshot every 5 s and a heartbeat every 20 s,
  each one API request, plus the snapshot the sidecar sends before each chunk completion. Each
  snapshot causes at most one push_metrics Lambda invocation, through the metrics table's stream;
- per job: submission and teardown (assembly, run report), metered on whole jobs of 10 and 40
  chunks and extrapolated linearly to the job's chunk count; the output's multipart upload;
  the Step Functions state transitions and Lambda tasks of launch, scale and teardown, counted
  from the happy paths of infra/statemachines/*.asl.json; the watchdog, once a minute.

DynamoDB requests and request units come from ``bench/write_units.py`` (item sizes and the
DynamoDB rules; moto reports no real consumed capacity). Lambda duration is an assumption (see
``--lambda-ms``), as are the watchdog's and push_metrics' reads. The watchdog serves every job
of the account, but its whole cost is charged to this job. Left out: the user's own API calls
(status polls, the dashboard), CloudWatch Logs and metrics, data transfer, S3 and DynamoDB
storage, free tiers.

Run: ``python bench/cost.py [--units FILE]``, where FILE is the JSON that
``python bench/write_units.py --json FILE`` writes (otherwise the meters run first, about 3 min).
The target: control-plane cost under 0.1% of the GPU cost.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from _harness import machine_line

from chalicelib import catalog, placement, prices, quotas
from chalicelib.config import load_settings
from chalicelib.roofline import Workload

# AWS list prices, us-east-1, USD, read 2026-12-04 from the pages named in docs/benchmarks.md.
PRICES = {
    # aws.amazon.com/lambda/pricing: $0.20 per 1M requests; $0.0000166667 per GB-second (x86).
    "lambda_request": 0.20 / 1e6,
    "lambda_gb_second": 0.0000166667,
    # API Gateway REST API, first 333 million requests a month: $3.50 per million.
    "api_request": 3.50 / 1e6,
    # DynamoDB on-demand, since the November 2024 price cut: $0.625 per million write request
    # units, $0.125 per million read request units.
    "dynamodb_wru": 0.625 / 1e6,
    "dynamodb_rru": 0.125 / 1e6,
    # S3 Standard: $0.005 per 1,000 PUT, COPY, POST, LIST; $0.0004 per 1,000 GET, HEAD and others.
    "s3_put": 0.005 / 1000,
    "s3_get": 0.0004 / 1000,
    # Step Functions standard workflows: $0.025 per 1,000 state transitions.
    "sfn_transition": 0.025 / 1000,
}
# S3 operations billed at the PUT, COPY, POST, LIST rate; the rest are billed at the GET rate.
S3_PUT_CLASS = {
    "PutObject",
    "CopyObject",
    "CreateMultipartUpload",
    "UploadPart",
    "CompleteMultipartUpload",
    "ListObjects",
    "ListObjectsV2",
}

MODEL_NAME = "meta-llama/Llama-3.1-70B-Instruct"
GPU_TYPE = "A100-40GB"
INSTANCE_TYPE = "p4d.24xlarge"
NUM_REQUESTS = 1_000_000
CHUNK_SIZE = 1000
WORKLOAD = Workload(
    num_requests=NUM_REQUESTS,
    avg_input_tokens=800,
    max_input_tokens=4000,
    avg_output_tokens=300,
    max_output_tokens=1024,
)
SNAPSHOT_SECONDS = 5.0
HEARTBEAT_SECONDS = 20.0
WATCHDOG_SECONDS = 60.0
# Bytes of one line of the assembled output: about 4 bytes per output token plus the OpenAI
# batch envelope (ids, usage, status).
OUTPUT_LINE_BYTES = 4 * 300 + 400
# Multipart part size of the assembled output (chalicelib/storage.py PART_SIZE).
PART_BYTES = 8 * 1024 * 1024
# Chalice's default Lambda memory for the API handler; lifecycle_task has 512 MB
# (.chalice/config.json), which this estimate also uses for every API request's duration.
LAMBDA_MB = 128
LIFECYCLE_LAMBDA_MB = 512
# Assumed reads per watchdog run for one active job (the active-jobs index, the job item, its
# replicas, the expired-leases index) and per push_metrics invocation (the job's subscribers).
WATCHDOG_RRU = 5.0
PUSH_METRICS_RRU = 1.0


def solve_job() -> dict[str, Any]:
    """Returns the solver's placement of the job on one p4d.24xlarge replica, on-demand."""
    arch = catalog.find_model(MODEL_NAME)
    options = placement.Options(
        regions=("us-east-1",),
        markets=("on_demand",),
        gpu_types=frozenset({GPU_TYPE}),
        tp_size=8,
        pp_size=1,
        max_replicas=1,
    )
    quota_source = quotas.StaticQuotaSource({"*": {"P": {"on_demand": 4096, "spot": 4096}}})
    # A deadline long enough for one replica: the figure is the runtime, not the replica count.
    solution = placement.solve(
        arch, WORKLOAD, 240.0, options, quota_source, prices.StaticPriceSource()
    )
    found = [p for p in solution.placements if p["instance_type"] == INSTANCE_TYPE]
    if not found:
        raise SystemExit(f"the solver placed no {INSTANCE_TYPE}: {solution.infeasibility()}")
    return found[0]


def _fit(jobs: dict[str, Any], phase: str, key: str, chunks: int) -> float:
    """Extrapolates a per-job figure metered on two job sizes linearly to ``chunks`` chunks."""
    (small, small_job), (large, large_job) = sorted((int(n), job) for n, job in jobs.items())

    def value(job: dict[str, Any]) -> float:
        if key.startswith("s3:"):
            put = sum(n for op, n in job[f"{phase}_s3"].items() if op in S3_PUT_CLASS)
            total = sum(job[f"{phase}_s3"].values())
            return put if key == "s3:put" else total - put
        return job[phase][key]

    slope = (value(large_job) - value(small_job)) / (large - small)
    return max(0.0, value(small_job) + slope * (chunks - small))


def job_counts(units: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Counts the job's billable units, by source."""
    settings = load_settings()
    replicas = top["replicas"]
    runtime = top["estimated_runtime_hours"] * 3600
    chunks = math.ceil(NUM_REQUESTS / CHUNK_SIZE)
    chunk_tokens = CHUNK_SIZE * (WORKLOAD.avg_input_tokens + WORKLOAD.avg_output_tokens)
    chunk_seconds = chunk_tokens / top["replica_tokens_per_sec"]
    # The sidecar pulls the next chunk while the current one's last requests run, so a lease is
    # held for up to two chunk times. The sidecar renews it every third of the lease.
    renews_per_chunk = math.floor(2 * chunk_seconds / (settings.lease_seconds / 3))
    steps = units["lifecycle"][max(units["lifecycle"], key=int)]
    # The periodic snapshots, and the one each sidecar sends just before it completes a chunk.
    snapshots = replicas * runtime / SNAPSHOT_SECONDS + chunks
    heartbeats = replicas * runtime / HEARTBEAT_SECONDS
    watchdog_runs = runtime / WATCHDOG_SECONDS
    # Happy paths: scale (Map + one StartLaunch per replica), launch (LaunchCandidate, Launched,
    # WaitUntilReady, Ready per replica), teardown (Assemble, WriteReport, TerminateInstances);
    # one more transition per execution for its start.
    transitions = (2 + replicas) + replicas * (4 + 1) + (3 + 1)
    lifecycle_tasks = replicas + 2 * replicas + 3

    rows: dict[str, dict[str, float]] = {}

    def add(name: str, count: float, per: dict[str, float]) -> None:
        rows[name] = {"count": count, **{k: v * count for k, v in per.items()}}

    for step, per_chunk in (("pull", 1), ("renew", renews_per_chunk), ("complete", 1)):
        summary = steps[step]
        add(
            f"chunk {step}",
            chunks * per_chunk,
            {
                "api": 1,
                "lambda": 1,
                "ddb_requests": summary["requests"],
                "wru": summary["wru"],
                "rru": summary["rru"],
            },
        )
    # Sidecar: ranged GET of the input and PUT of the output; control plane: HEAD of the output.
    add("chunk S3 objects", chunks, {"s3_get": 2, "s3_put": 1})
    snapshot = units["snapshot"]
    add(
        "metrics snapshots",
        snapshots,
        {
            "api": 1,
            "lambda": 2,  # the ingest request and, at most, one push_metrics invocation
            "ddb_requests": snapshot["requests"] + 1,
            "wru": snapshot["wru"],
            "rru": snapshot["rru"] + PUSH_METRICS_RRU,
        },
    )
    heartbeat = units["heartbeat"]
    add(
        "heartbeats",
        heartbeats,
        {
            "api": 1,
            "lambda": 1,
            "ddb_requests": heartbeat["requests"],
            "wru": heartbeat["wru"],
            "rru": heartbeat["rru"],
        },
    )
    add("watchdog", watchdog_runs, {"lambda": 1, "ddb_requests": 4, "rru": WATCHDOG_RRU})
    jobs = units["jobs"]
    for phase in ("submission", "teardown"):
        add(
            phase,
            1,
            {
                "api": 1 if phase == "submission" else 0,
                "lambda": 1,
                "ddb_requests": _fit(jobs, phase, "requests", chunks),
                "wru": _fit(jobs, phase, "wru", chunks),
                "rru": _fit(jobs, phase, "rru", chunks),
                "s3_put": _fit(jobs, phase, "s3:put", chunks),
                "s3_get": _fit(jobs, phase, "s3:get", chunks),
            },
        )
    output_parts = math.ceil(NUM_REQUESTS * OUTPUT_LINE_BYTES / PART_BYTES)
    add("output multipart upload", 1, {"s3_put": output_parts + 2})
    add(
        "launch, scale, teardown executions",
        1,
        {"sfn": transitions, "lambda": lifecycle_tasks, "lifecycle_lambda": lifecycle_tasks},
    )
    return {
        "rows": rows,
        "chunks": chunks,
        "chunk_seconds": chunk_seconds,
        "renews_per_chunk": renews_per_chunk,
        "runtime_seconds": runtime,
        "replicas": replicas,
    }


def dollars(row: dict[str, float], args: argparse.Namespace) -> dict[str, float]:
    lifecycle_calls = row.get("lifecycle_lambda", 0.0)
    api_calls = row.get("lambda", 0.0) - lifecycle_calls
    gb_seconds = (
        api_calls * args.lambda_ms / 1000 * LAMBDA_MB / 1024
        + lifecycle_calls * args.lifecycle_ms / 1000 * LIFECYCLE_LAMBDA_MB / 1024
    )
    return {
        "API Gateway": row.get("api", 0.0) * PRICES["api_request"],
        "Lambda": row.get("lambda", 0.0) * PRICES["lambda_request"]
        + gb_seconds * PRICES["lambda_gb_second"],
        "DynamoDB": row.get("wru", 0.0) * PRICES["dynamodb_wru"]
        + row.get("rru", 0.0) * PRICES["dynamodb_rru"],
        "S3": row.get("s3_put", 0.0) * PRICES["s3_put"] + row.get("s3_get", 0.0) * PRICES["s3_get"],
        "Step Functions": row.get("sfn", 0.0) * PRICES["sfn_transition"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=Path, help="JSON written by bench/write_units.py --json")
    parser.add_argument(
        "--lambda-ms",
        type=float,
        default=300.0,
        help="billed duration of one API Lambda invocation, ms (default 300: a 128 MB Lambda "
        "has about 7%% of a vCPU, and this covers the DynamoDB round trips and cold starts)",
    )
    parser.add_argument(
        "--lifecycle-ms",
        type=float,
        default=5000.0,
        help="billed duration of one lifecycle task invocation at 512 MB, ms",
    )
    args = parser.parse_args()

    if args.units:
        units = json.loads(args.units.read_text())
    else:
        import write_units

        units = json.loads(json.dumps(write_units.measure_all()))

    print(machine_line())
    top = solve_job()
    counts = job_counts(units, top)
    gpu_hours = counts["runtime_seconds"] / 3600 * counts["replicas"] * top["num_instances"]
    gpu_cost = gpu_hours * top["price_per_instance_hour"]
    print(
        f"job: {MODEL_NAME}, {NUM_REQUESTS:,} requests ({WORKLOAD.avg_input_tokens:.0f} prompt + "
        f"{WORKLOAD.avg_output_tokens:.0f} output tokens), chunk_size {CHUNK_SIZE}, "
        f"{counts['chunks']} chunks"
    )
    print(
        f"solver: {counts['replicas']} x {INSTANCE_TYPE} tp{top['tp_size']} pp{top['pp_size']} "
        f"on-demand at ${top['price_per_instance_hour']:.2f}/h, "
        f"{top['replica_tokens_per_sec']:.0f} tokens/s per replica, runtime "
        f"{top['estimated_runtime_hours']:.2f} h; a chunk takes {counts['chunk_seconds']:.0f} s, "
        f"{counts['renews_per_chunk']} renews per chunk"
    )

    totals = {"count": 0.0}
    by_service: dict[str, float] = {}
    print(
        f"\n{'source':<36} {'count':>9} {'API req':>9} {'DDB req':>9} {'WRU':>10} {'RRU':>9} "
        f"{'S3 req':>7} {'cost $':>9}"
    )
    for name, row in counts["rows"].items():
        cost = dollars(row, args)
        for service, amount in cost.items():
            by_service[service] = by_service.get(service, 0.0) + amount
        for key, value in row.items():
            totals[key] = totals.get(key, 0.0) + value
        print(
            f"{name:<36} {row['count']:>9.0f} {row.get('api', 0):>9.0f} "
            f"{row.get('ddb_requests', 0):>9.0f} {row.get('wru', 0):>10.0f} "
            f"{row.get('rru', 0):>9.0f} {row.get('s3_put', 0) + row.get('s3_get', 0):>7.0f} "
            f"{sum(cost.values()):>9.4f}"
        )
    control_cost = sum(by_service.values())
    print(
        f"{'total':<36} {'':>9} {totals.get('api', 0):>9.0f} {totals.get('ddb_requests', 0):>9.0f}"
        f" {totals.get('wru', 0):>10.0f} {totals.get('rru', 0):>9.0f} "
        f"{totals.get('s3_put', 0) + totals.get('s3_get', 0):>7.0f} {control_cost:>9.4f}"
    )
    print("\nby service: " + ", ".join(f"{k} ${v:.4f}" for k, v in by_service.items()))
    print(
        f"Lambda duration assumed: {args.lambda_ms:.0f} ms at {LAMBDA_MB} MB per API invocation, "
        f"{args.lifecycle_ms:.0f} ms at {LIFECYCLE_LAMBDA_MB} MB per lifecycle task"
    )
    ratio = control_cost / gpu_cost
    print(
        f"control plane ${control_cost:.2f} per job = ${control_cost / NUM_REQUESTS * 1e6:.2f} "
        f"per million requests; GPU ${gpu_cost:,.2f} ({gpu_hours:.1f} instance-hours); "
        f"ratio {100 * ratio:.4f}% (target under 0.1%)"
    )
    return 0 if ratio < 0.001 else 1


if __name__ == "__main__":
    sys.exit(main())
