"""CLI commands for metrics and run analytics: ``metrics``, ``stream``, ``history``, ``inspect``,
``timeseries``. ``register(app)`` adds them to the ``tandemn`` command."""

from __future__ import annotations

import json
import time
from typing import Any

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table

from tandemn.api_client import ApiClient, ApiError
from tandemn.cli_common import (  # noqa: F401
    TERMINAL_STATUSES,
    ApiUrl,
    JsonFlag,
    _call,
    _client,
    _fail,
    _print_json,
    _print_json_line,
    console,
    errors,
    key_value_table,
    number_in,
    print_listing,
    valid_id,
)

# (label, snapshot fields, unit) of the rows the tables show.
SNAPSHOT_ROWS: list[tuple[str, tuple[str, ...], str]] = [
    ("output tokens/s", ("avg_generation_throughput_toks_per_s",), "tok/s"),
    ("prompt tokens/s", ("avg_prompt_throughput_toks_per_s",), "tok/s"),
    (
        "requests running / waiting / swapped",
        (
            "num_requests_running",
            "num_requests_waiting",
            "num_requests_swapped",
        ),
        "",
    ),
    ("KV cache used", ("gpu_cache_usage_perc",), "fraction"),
    ("time to first token p50 / p95 / p99", ("ttft_ms_p50", "ttft_ms_p95", "ttft_ms_p99"), "ms"),
    ("time per output token p50 / p95 / p99", ("tpot_ms_p50", "tpot_ms_p95", "tpot_ms_p99"), "ms"),
    ("end-to-end latency p50 / p95 / p99", ("e2e_ms_p50", "e2e_ms_p95", "e2e_ms_p99"), "ms"),
    ("queue time p50 / p95", ("queue_time_ms_p50", "queue_time_ms_p95"), "ms"),
    ("requests succeeded", ("request_success_total",), ""),
    ("preemptions", ("num_preemptions_total",), ""),
    ("output / prompt tokens (engine)", ("generation_tokens_total", "prompt_tokens_total"), ""),
    ("output / prompt tokens (sidecar)", ("live_gen_tokens_total", "live_prompt_tokens_total"), ""),
    ("prefix cache hit rate", ("prefix_cache_hit_rate",), "fraction"),
    ("GPU SM / memory bandwidth", ("gpu_sm_util_pct", "gpu_mem_bw_util_pct"), "%"),
]




def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _cell(snapshot: dict[str, Any], fields: tuple[str, ...], unit: str) -> str:
    text = " / ".join(_format(snapshot.get(name)) for name in fields)
    return f"{text} {unit}".strip() if any(snapshot.get(n) is not None for n in fields) else "-"


def snapshot_table(snapshots: dict[str, dict[str, Any]], title: str) -> Table:
    """Builds a table with one column per snapshot (the job or a replica) and a row per metric."""
    table = Table("metric", *snapshots.keys(), title=title)
    for label, fields, unit in SNAPSHOT_ROWS:
        table.add_row(label, *(_cell(s, fields, unit) for s in snapshots.values()))
    per_gpu = sorted(
        {
            k
            for s in snapshots.values()
            for k in s
            if k.startswith("gpu") and "_" in k[3:] and k[3].isdigit()
        }
    )
    for key in per_gpu:
        table.add_row(key, *(_format(s.get(key)) for s in snapshots.values()))
    return table


def _metrics_view(
    client: ApiClient, job_id: str, replica: str | None, compare: bool
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Returns the snapshots to show, keyed by column title, and the raw JSON."""
    if replica:
        snapshot = client.get(f"/job/{job_id}/replicas/{replica}/metrics")
        return {replica: snapshot}, snapshot
    job = client.get(f"/job/{job_id}/metrics")
    columns = {"job": job}
    raw: dict[str, Any] = {"job": job}
    if compare:
        replicas = client.get(f"/job/{job_id}/replicas")["replicas"]
        raw["replicas"] = {}
        for entry in replicas:
            try:
                snapshot = client.get(f"/job/{job_id}/replicas/{entry['replica_id']}/metrics")
            except ApiError as error:
                if error.status_code == 404:
                    continue
                raise
            name = entry["replica_id"].removeprefix(f"{job_id}-")
            columns[f"{name} ({entry.get('phase')})"] = snapshot
            raw["replicas"][entry["replica_id"]] = snapshot
    return columns, raw


def metrics(
    job_id: str = typer.Argument(..., callback=valid_id, help="Job whose metrics to show."),
    watch: bool = typer.Option(
        False, "-w", "--watch", help="Refresh until the job ends or Ctrl-C is pressed."
    ),
    interval: float = typer.Option(
        2.0, "--interval", callback=number_in(0.5), help="Seconds between refreshes with --watch."
    ),
    replica: str | None = typer.Option(
        None, "--replica", callback=valid_id, help="Show this replica's snapshot instead of the job's."
    ),
    compare: bool = typer.Option(
        False, "--compare", help="Add one column per replica next to the job's totals."
    ),
    api_url: str | None = ApiUrl,
    as_json: bool = typer.Option(
        False,
        "--json",
        help="Print the API's JSON instead of a table; with --watch, one line per refresh.",
    ),
) -> None:
    """Show a job's metrics: throughput, queue, KV cache, latency quantiles, tokens, GPU use."""
    client = _client(api_url)
    if not watch:
        columns, raw = _call(_metrics_view, client, job_id, replica, compare)
        if as_json:
            _print_json(raw)
        else:
            console.print(snapshot_table(columns, f"metrics of {job_id}"))
        return
    if as_json:
        _watch_json(client, job_id, replica, compare, interval)
        return
    with Live(console=console, refresh_per_second=4) as live:
        while True:
            status = _call(client.get, f"/job/{job_id}")["status"]
            try:
                columns, raw = _metrics_view(client, job_id, replica, compare)
            except ApiError as error:
                if error.status_code != 404:
                    _fail(str(error))
                live.update(f"{job_id} {status}: no metrics yet")
            else:
                live.update(
                    Group(
                        snapshot_table(columns, f"metrics of {job_id} ({status})"),
                        f"refreshed {time.strftime('%H:%M:%S')}, every {interval:g} s",
                    )
                )
            if status in TERMINAL_STATUSES:
                return
            time.sleep(interval)


def _watch_json(
    client: ApiClient, job_id: str, replica: str | None, compare: bool, interval: float
) -> None:
    """Prints the metrics JSON on one line per refresh until the job ends.

    Nothing is printed while the job has no snapshot yet.
    """
    while True:
        status = _call(client.get, f"/job/{job_id}")["status"]
        try:
            _, raw = _metrics_view(client, job_id, replica, compare)
        except ApiError as error:
            if error.status_code != 404:
                _fail(str(error))
        else:
            _print_json_line({"job_status": status, **raw})
        if status in TERMINAL_STATUSES:
            return
        time.sleep(interval)


def parse_events(text: str) -> tuple[list[tuple[str, str]], float | None]:
    """Splits a server-sent events body into (event, data) pairs and the ``retry`` in seconds."""
    events: list[tuple[str, str]] = []
    retry: float | None = None
    name, data = "message", []
    for line in [*text.splitlines(), ""]:
        if line == "":
            if data:
                events.append((name, "\n".join(data)))
            name, data = "message", []
        elif line.startswith("retry:"):
            retry = int(line[len("retry:") :].strip()) / 1000.0
        elif line.startswith("event:"):
            name = line[len("event:") :].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:") :].strip())
    return events, retry


def stream(
    job_id: str = typer.Argument(..., callback=valid_id, help="Job whose metrics to follow."),
    api_url: str | None = ApiUrl,
    as_json: bool = typer.Option(
        False, "--json", help="Print each snapshot as one JSON line instead of a summary line."
    ),
) -> None:
    """Follow a job's metrics through its server-sent events stream until the job ends."""
    client = _client(api_url)
    last_timestamp = None
    while True:
        text = _call(client.get_text, f"/job/{job_id}/metrics/stream")
        events, retry = parse_events(text)
        ended = False
        for name, data in events:
            payload = json.loads(data)
            if name == "metrics" and payload.get("timestamp") != last_timestamp:
                last_timestamp = payload.get("timestamp")
                if as_json:
                    _print_json_line(payload)
                else:
                    console.print(
                        f"{time.strftime('%H:%M:%S')} "
                        f"{_format(payload.get('avg_generation_throughput_toks_per_s'))} tok/s out, "
                        f"running {_format(payload.get('num_requests_running'))}, "
                        f"waiting {_format(payload.get('num_requests_waiting'))}, "
                        f"TTFT p50 {_format(payload.get('ttft_ms_p50'))} ms, "
                        f"TPOT p50 {_format(payload.get('tpot_ms_p50'))} ms, "
                        f"tokens out {_format(payload.get('generation_tokens_total'))}",
                        highlight=False,
                    )
            elif name == "end":
                ended = True
                if not as_json:
                    console.print(f"job {job_id} {payload.get('job_status')}")
        if ended:
            return
        time.sleep(retry or 2.0)


def _print_runs(runs: list[dict[str, Any]]) -> None:
    rows = []
    for run in runs:
        finished = run.get("finished_at")
        rows.append(
            [
                run["run_id"],
                run.get("status") or "-",
                str(run.get("model_name")),
                _format(run.get("num_replicas")),
                ", ".join(run.get("gpu_types") or []) or "-",
                _format(run.get("total_runtime_sec")),
                _format(run.get("output_tokens_per_sec")),
                _format(run.get("cost_usd")),
                _format(run.get("cost_per_million_tokens")),
                time.strftime("%Y-%m-%d %H:%M", time.localtime(finished)) if finished else "-",
            ]
        )
    headers = ["run", "status", "model", "replicas", "GPU", "runtime s", "out tok/s"]
    print_listing([*headers, "cost USD", "USD / M tokens", "finished"], rows)


def history(
    model: str | None = typer.Option(
        None, "--model", help="Only runs whose model name contains this text (any case)."
    ),
    gpu: str | None = typer.Option(
        None, "--gpu", help="Only runs on a GPU type containing this text, e.g. L40S."
    ),
    limit: int = typer.Option(20, "--limit", min=1, max=200, help="Runs to list, newest first."),
    api_url: str | None = ApiUrl,
    as_json: bool = JsonFlag,
) -> None:
    """List finished runs with their throughput and cost."""
    params: dict[str, Any] = {"limit": limit}
    if model:
        params["model"] = model
    if gpu:
        params["gpu"] = gpu
    listing = _call(_client(api_url).get, "/analytics/runs", params)
    if as_json:
        _print_json(listing)
    else:
        _print_runs(listing["runs"])


def inspect(
    run_id: str = typer.Argument(..., callback=valid_id, help="Run to show (the job id of a finished job)."),
    replicas: bool = typer.Option(
        False, "--replicas", help="Also list each replica with its runtime, cost and summary."
    ),
    api_url: str | None = ApiUrl,
    as_json: bool = JsonFlag,
) -> None:
    """Show a run's report: configuration, runtime, tokens, throughput, latency and cost."""
    run = _call(_client(api_url).get, f"/analytics/runs/{run_id}")["run"]
    if as_json:
        _print_json(run if replicas else {k: v for k, v in run.items() if k != "replicas"})
        return
    table = key_value_table(title=f"run {run_id}")
    runtime, tokens, throughput = run["runtime"], run["tokens"], run["throughput"]
    latency = run.get("latency") or {}
    for label, value in (
        ("model", run.get("model_name")),
        ("status", run.get("status")),
        ("replicas", run.get("num_replicas")),
        ("GPU types", ", ".join(run.get("gpu_types") or []) or "-"),
        (
            "runtime",
            (
                f"{_format(runtime.get('total_runtime_sec'))} s "
                f"(generating {_format(runtime.get('generation_time_sec'))} s)"
            ),
        ),
        (
            "requests",
            f"{run['requests']['succeeded']} succeeded, {run['requests']['failed']} failed"
            + (
                f", {run['requests']['cancelled']} cancelled"
                if run["requests"].get("cancelled")
                else ""
            ),
        ),
        (
            "tokens",
            (
                f"{_format(tokens['prompt'])} prompt, {_format(tokens['generation'])} output "
                f"(from {tokens.get('source')})"
            ),
        ),
        (
            "throughput",
            (
                f"{_format(throughput.get('output_tokens_per_sec'))} output tok/s, "
                f"{_format(throughput.get('requests_per_sec'))} requests/s"
            ),
        ),
        (
            "TTFT p50 / p95 / p99",
            _cell(latency, ("ttft_ms_p50", "ttft_ms_p95", "ttft_ms_p99"), "ms"),
        ),
        (
            "TPOT p50 / p95 / p99",
            _cell(latency, ("tpot_ms_p50", "tpot_ms_p95", "tpot_ms_p99"), "ms"),
        ),
        ("E2E p50 / p95 / p99", _cell(latency, ("e2e_ms_p50", "e2e_ms_p95", "e2e_ms_p99"), "ms")),
        ("cost", f"{_format(run.get('cost_usd'))} USD"),
        ("cost per million tokens", f"{_format(run.get('cost_per_million_tokens'))} USD"),
    ):
        table.add_row(label, str(value))
    engine = run.get("engine_tokens")
    if engine:
        table.add_row(
            "engine tokens",
            f"{_format(engine['prompt'])} prompt, {_format(engine['generation'])} output "
            "(the engines' own counters, from their metrics snapshots)",
        )
    console.print(table)
    if replicas:
        rows = [
            [
                entry["replica_id"],
                str(entry.get("phase")),
                str(entry.get("instance_type") or "-"),
                str(entry.get("gpu_type") or "-"),
                str(entry.get("market") or "-"),
                _format(entry.get("running_seconds")),
                _format(entry.get("price_per_hour")),
                _format(entry.get("accrued_usd")),
            ]
            for entry in run.get("replicas") or []
        ]
        headers = ["replica", "phase", "instance", "GPU", "market", "running s", "USD/h", "USD"]
        print_listing(headers, rows)


def timeseries(
    run_id: str = typer.Argument(..., callback=valid_id, help="Run whose stored snapshots to show."),
    replica: str | None = typer.Option(
        None, "--replica", callback=valid_id, help="Only this replica's rows (default: every replica)."
    ),
    start: float | None = typer.Option(
        None, "--start", callback=number_in(None), help="First time to include, Unix seconds."
    ),
    end: float | None = typer.Option(
        None, "--end", callback=number_in(None), help="Last time to include, Unix seconds."
    ),
    step: float = typer.Option(
        5.0,
        "--step",
        callback=number_in(1.0),
        help="Seconds between the job-level rows that aggregate replicas.",
    ),
    api_url: str | None = ApiUrl,
    as_json: bool = JsonFlag,
) -> None:
    """Show a run's metric snapshots over time, aggregated over its replicas."""
    params: dict[str, Any] = {"step": step}
    for name, value in (("replica", replica), ("start", start), ("end", end)):
        if value is not None:
            params[name] = value
    body = _call(_client(api_url).get, f"/analytics/runs/{run_id}/timeseries", params)
    if as_json:
        _print_json(body)
        return
    rows = body["timeseries"] if replica else body["aggregated"]
    # One source for the whole column: the engines' counter where any row has it, else the
    # sidecars' count. The two count differently, so mixing them would make the total jump.
    tokens_key = (
        "generation_tokens_total"
        if any(row.get("generation_tokens_total") is not None for row in rows)
        else "live_gen_tokens_total"
    )
    tokens_header = "tokens out (engine)" if tokens_key == "generation_tokens_total" else (
        "tokens out (sidecar)"
    )
    headers = ["time", "out tok/s", "prompt tok/s", "running", "waiting", "KV cache"]
    headers += ["TTFT p50 ms", "TPOT p50 ms", tokens_header]
    listing = [
        [
            time.strftime("%H:%M:%S", time.localtime(row["timestamp"]))
            if row.get("timestamp")
            else "-",
            _format(row.get("avg_generation_throughput_toks_per_s")),
            _format(row.get("avg_prompt_throughput_toks_per_s")),
            _format(row.get("num_requests_running")),
            _format(row.get("num_requests_waiting")),
            _format(row.get("gpu_cache_usage_perc")),
            _format(row.get("ttft_ms_p50")),
            _format(row.get("tpot_ms_p50")),
            _format(row.get(tokens_key)),
        ]
        for row in rows
    ]
    scope = f"replica {replica}" if replica else "all replicas"
    print_listing(headers, listing, title=f"{run_id}: {scope}, {len(rows)} rows")


def register(app: typer.Typer) -> None:
    """Adds the metrics and analytics commands to the ``tandemn`` command."""
    app.command()(metrics)
    app.command()(stream)
    app.command()(history)
    app.command()(inspect)
    app.command()(timeseries)
