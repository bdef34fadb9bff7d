"""The ``tandemn`` command-line tool."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tandemn import cli_metrics, cli_replicas
from tandemn.api_client import ApiClient
from tandemn.cli_common import _call, _client, _fail, _print_json, console, errors

app = typer.Typer(
    help="Batch LLM inference on GPUs: submit, watch and collect jobs.", no_args_is_help=True
)
local_app = typer.Typer(
    help="Run the whole control plane on this machine (127.0.0.1).", no_args_is_help=True
)
app.add_typer(local_app, name="local")


TERMINAL_STATUSES = {"succeeded", "completed_with_errors", "failed", "cancelled"}
PID_FILE = Path(__file__).resolve().parent.parent / ".cache" / "local" / "stack.pid"
# The running local stack's addresses, for `tandemn deploy --local`.
STACK_FILE = PID_FILE.with_name("stack.json")

ApiUrl = typer.Option(
    None,
    "--api-url",
    help="Control-plane URL (default: $TANDEMN_API_URL or http://127.0.0.1:26336).",
)
JsonFlag = typer.Option(False, "--json", help="Print the API's JSON instead of a table.")




@app.command()
def deploy(
    model: str = typer.Argument(..., help="Model name, e.g. Qwen/Qwen2.5-7B-Instruct."),
    input_file: str = typer.Argument(
        ...,
        metavar="INPUT",
        help="JSONL file of OpenAI batch requests: a local path or s3://bucket/key.",
    ),
    replicas: int | None = typer.Option(
        None, "--replicas", min=1, help="Replicas to start (default: 1 on the local stack)."
    ),
    chunk_size: int = typer.Option(
        1000, "--chunk-size", min=1, help="Requests per chunk (the unit a replica leases)."
    ),
    max_output_tokens: int | None = typer.Option(
        None, "--max-output-tokens", min=1, help="Cap on each request's max_tokens, in tokens."
    ),
    slo: float = typer.Option(4.0, "--slo", min=0.01, help="Deadline for the whole job, in hours."),
    description: str | None = typer.Option(
        None, "--description", help="Free text stored with the job."
    ),
    wait: bool = typer.Option(
        False, "--wait", help="Show progress until the job ends; exit non-zero unless it succeeded."
    ),
    local: bool = typer.Option(
        False,
        "--local",
        help="Submit to the local stack started by `tandemn local up`, whose replicas launch "
        "through its state machines (overrides $TANDEMN_API_URL).",
    ),
    api_url: str | None = ApiUrl,
    as_json: bool = JsonFlag,
) -> None:
    """Upload INPUT (if local) and submit it as a batch job."""
    if local and api_url is None:
        api_url = _local_stack_url()
    client = _client(api_url)
    if input_file.startswith("s3://"):
        uri = input_file
    else:
        path = Path(input_file)
        if not path.is_file():
            _fail(f"input file {input_file} not found; give a path to a JSONL file or an s3:// URI")
        uri = _call(client.upload, path)
    body: dict[str, Any] = {
        "model_name": model,
        "input_file": uri,
        "chunk_size": chunk_size,
        "slo_deadline_hours": slo,
    }
    for name, value in (
        ("replicas", replicas),
        ("max_output_tokens", max_output_tokens),
        ("description", description),
    ):
        if value is not None:
            body[name] = value
    submitted = _call(client.post, "/submit/batch", body)
    if as_json:
        _print_json(submitted)
    else:
        console.print(
            f"job [bold]{submitted['job_id']}[/bold] {submitted['status']}: "
            f"{submitted.get('chunks', 0)} chunks, replicas {', '.join(submitted.get('replicas') or []) or 'none yet'}"
        )
    if wait:
        final = _follow(client, submitted["job_id"])
        raise typer.Exit(0 if final["status"] == "succeeded" else 1)


def _local_stack_url() -> str:
    """Returns the API URL that `tandemn local up` recorded, failing when no stack runs."""
    if not STACK_FILE.exists() or not PID_FILE.exists():
        _fail("no local stack is running; start one with `tandemn local up`")
    return json.loads(STACK_FILE.read_text())["api_url"]


def _job_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table("job", "status", "progress", "model", "requests", "created")
    for job in jobs:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.get("created_at") or 0))
        table.add_row(
            job["job_id"],
            job["status"],
            f"{100 * job.get('progress', 0):.1f}%",
            str(job.get("model_name")),
            str(job.get("num_lines", 0)),
            created,
        )
    return table


@app.command()
def status(
    job_id: str | None = typer.Argument(None, help="Job to show; omit to list recent jobs."),
    limit: int = typer.Option(20, "--limit", min=1, max=200, help="Jobs to list."),
    api_url: str | None = ApiUrl,
    as_json: bool = JsonFlag,
) -> None:
    """Show one job, or list recent jobs."""
    client = _client(api_url)
    if job_id is None:
        listing = _call(client.get, "/jobs", {"limit": limit})
        if as_json:
            _print_json(listing)
        else:
            console.print(_job_table(listing["jobs"]))
        return
    job = _call(client.get, f"/job/{job_id}")
    if as_json:
        _print_json(job)
        return
    chunks = job["chunks"]
    table = Table(show_header=False)
    for label, value in (
        ("job", job["job_id"]),
        ("status", job["status"]),
        ("model", job.get("model_name")),
        ("requests", job.get("num_lines")),
        ("progress", f"{100 * job['progress']:.1f}%"),
        (
            "chunks",
            f"{chunks['completed']} completed, {chunks['inflight']} in flight, {chunks['pending']} pending, {chunks['failed']} failed of {chunks['total']}",
        ),
        ("requests done", job.get("requests_done")),
        ("output tokens", job.get("generation_tokens_total")),
        ("output", job.get("output_file") or job.get("output_location")),
    ):
        table.add_row(label, str(value))
    if job.get("validation_errors"):
        for error in job["validation_errors"]:
            table.add_row("input error", error["message"])
    console.print(table)


def _follow(client: ApiClient, job_id: str, interval: float = 1.0) -> dict[str, Any]:
    """Shows a progress bar (requests done, output tokens/s, ETA) until the job ends."""
    job = _call(client.get, f"/job/{job_id}")
    total = max(int(job.get("num_lines") or 0), 1)
    samples: list[tuple[float, int]] = []
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} requests"),
        TextColumn("{task.fields[rate]}"),
        TextColumn("ETA {task.fields[eta]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(job_id, total=total, rate="- tok/s", eta="-")
        while True:
            job = _call(client.get, f"/job/{job_id}")
            total = max(int(job.get("num_lines") or 0), 1)
            done = int(job.get("requests_done") or 0)
            now = time.monotonic()
            # Replicas report tokens when a chunk completes, so a short window would often
            # show none; the rate is the average since this command started following.
            samples.append((now, int(job.get("generation_tokens_total") or 0)))
            samples = [samples[0], samples[-1]]
            rate_text, eta_text = "- tok/s", "-"
            if len(samples) >= 2 and samples[-1][0] > samples[0][0]:
                rate = (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0])
                rate_text = f"{rate:.0f} tok/s"
                if done > 0 and rate > 0 and samples[-1][1] > 0:
                    tokens_per_request = samples[-1][1] / done
                    eta_text = f"{(total - done) * tokens_per_request / rate:.0f}s"
            progress.update(
                task,
                total=total,
                completed=done,
                rate=rate_text,
                eta=eta_text,
                description=f"{job_id} {job['status']}",
            )
            if job["status"] in TERMINAL_STATUSES:
                break
            time.sleep(interval)
    summary = f"job {job_id} {job['status']}"
    if job.get("requests_succeeded") is not None:
        summary += f": {job['requests_succeeded']} succeeded, {job['requests_failed']} failed"
    if job.get("failure_reason"):
        summary += f" ({job['failure_reason']})"
    console.print(summary)
    return job


@app.command()
def progress(
    job_id: str = typer.Argument(..., help="Job to follow."),
    api_url: str | None = ApiUrl,
) -> None:
    """Follow a job with a progress bar until it ends (requests done, output tokens/s, ETA)."""
    final = _follow(_client(api_url), job_id)
    raise typer.Exit(0 if final["status"] == "succeeded" else 1)


@app.command()
def download(
    job_id: str = typer.Argument(..., help="Finished job whose output to fetch."),
    output: Path | None = typer.Option(
        None,
        "-o",
        "--output",
        help="Path of output.jsonl (default out/JOB/output.jsonl); errors.jsonl is written beside it.",
    ),
    api_url: str | None = ApiUrl,
) -> None:
    """Download a finished job's output.jsonl and errors.jsonl."""
    client = _client(api_url)
    links = _call(client.get, f"/job/{job_id}/output")
    destination = output or Path("out") / job_id / "output.jsonl"
    written = _call(client.download, links["output_url"], destination)
    errors_path = destination.with_name("errors.jsonl")
    error_bytes = _call(client.download, links["error_url"], errors_path)
    console.print(f"wrote {destination} ({written} bytes) and {errors_path} ({error_bytes} bytes)")


@local_app.command("up")
def local_up(
    port: int = typer.Option(
        26336, "--port", help="Port of the API on 127.0.0.1; moto listens on the next one."
    ),
    engine: str = typer.Option(
        "llama",
        "--engine",
        help="'llama' runs llama.cpp's llama-server with SmolLM2-135M; 'fake' runs a simulated engine.",
    ),
    slots: int = typer.Option(
        4, "--slots", min=1, help="Requests each replica's engine serves at once."
    ),
    watchdog_seconds: float = typer.Option(
        10.0, "--watchdog-seconds", min=0.5, help="Seconds between watchdog passes."
    ),
    lease_seconds: int | None = typer.Option(
        None, "--lease-seconds", min=5, help="Chunk lease length in seconds (default 300)."
    ),
    engine_threads: int | None = typer.Option(
        None, "--engine-threads", min=1, help="CPU threads of each llama-server (default: half the cores)."
    ),
) -> None:
    """Start the local stack in the foreground; Ctrl-C stops it and every replica."""
    from tandemn import engine_paths
    from tandemn.stack import LocalStack, StackOptions

    options = StackOptions(
        api_port=port,
        slots=slots,
        watchdog_seconds=watchdog_seconds,
        lease_seconds=lease_seconds,
        engine_threads=engine_threads,
    )
    if engine == "llama":
        try:
            options.engine_binary, options.model_path = engine_paths.find_engine()
        except FileNotFoundError as error:
            _fail(str(error))
    elif engine != "fake":
        _fail(f"--engine {engine!r} is not known; use 'llama' or 'fake'")
    stack = LocalStack(options)
    stopping = {"now": False}

    def request_stop(signum: int, frame: Any) -> None:
        stopping["now"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        stack.start()
    except (RuntimeError, TimeoutError) as error:
        _fail(str(error))
    PID_FILE.parent.mkdir(parents=True, exist_ok=True)
    PID_FILE.write_text(str(os.getpid()))
    STACK_FILE.write_text(json.dumps({"api_url": stack.api_url, "moto_url": stack.moto_url}))
    console.print(
        f"local stack up: API {stack.api_url}, moto {stack.moto_url}, engine {engine}; Ctrl-C stops it"
    )
    try:
        while not stopping["now"]:
            time.sleep(0.2)
    finally:
        console.print("stopping the local stack")
        stack.stop()
        PID_FILE.unlink(missing_ok=True)
        STACK_FILE.unlink(missing_ok=True)


@local_app.command("down")
def local_down(
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds to wait for the stack to stop."),
) -> None:
    """Stop a local stack started by `tandemn local up`."""
    if not PID_FILE.exists():
        console.print("no local stack is running")
        return
    pid = int(PID_FILE.read_text().strip())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        PID_FILE.unlink(missing_ok=True)
        console.print("no local stack is running (removed a stale pid file)")
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            console.print("local stack stopped")
            return
        time.sleep(0.2)
    _fail(f"local stack (pid {pid}) did not stop within {timeout:.0f} s")


# metrics, stream, history, inspect and timeseries.
cli_metrics.register(app)
# add, kill, swap and replicas.
cli_replicas.register(app)


PLACEMENT_COLUMNS = (
    *("#", "instance", "GPU", "tp", "pp", "replicas", "market", "region"),
    *("tokens/s", "$/h", "$/M tokens", "hours", "deadline"),
)


def _placement_table(placements: list[dict[str, Any]]) -> Table:
    table = Table(*PLACEMENT_COLUMNS)
    for p in placements:
        table.add_row(
            str(p["rank"]),
            p["instance_type"],
            p["gpu_type"],
            str(p["tp_size"]),
            str(p["pp_size"]),
            f"{p['replicas']} x {p['num_instances']}",
            p["market"],
            p["region"],
            f"{p['throughput_tokens_per_sec']:.0f}",
            f"{p['cost_per_hour']:.2f}",
            f"{p['cost_per_million_tokens']:.3f}",
            f"{p['estimated_runtime_hours']:.2f}",
            "met" if p["meets_slo"] else f"missed ({p.get('limited_by') or 'throughput'})",
        )
    return table


@app.command()
def plan(
    model: str = typer.Argument(..., help="Model name, e.g. meta-llama/Llama-3.1-8B-Instruct."),
    input_file: str = typer.Argument(
        ...,
        metavar="INPUT",
        help="JSONL file of OpenAI batch requests: a local path (uploaded first) or s3://bucket/key.",
    ),
    slo: float = typer.Option(4.0, "--slo", min=0.01, help="Deadline for the whole job, in hours."),
    gpu_type: str | None = typer.Option(
        None, "--gpu-type", help="Only this GPU type, e.g. L4, L40S, A100, H100, H200, B200."
    ),
    on_demand: bool = typer.Option(
        False, "--on-demand", help="On-demand instances only (default: spot and on-demand)."
    ),
    limit: int = typer.Option(10, "--limit", min=1, max=1000, help="Placements to show."),
    api_url: str | None = ApiUrl,
    as_json: bool = JsonFlag,
) -> None:
    """Rank where INPUT would run: placements that meet the deadline first, cheapest first.

    Exits 1 when no placement fits (the reasons are printed).
    """
    client = _client(api_url)
    if input_file.startswith("s3://"):
        uri = input_file
    else:
        path = Path(input_file)
        if not path.is_file():
            _fail(f"input file {input_file} not found; give a path to a JSONL file or an s3:// URI")
        uri = _call(client.upload, path)
    body: dict[str, Any] = {
        "model_name": model,
        "input_file": uri,
        "slo_deadline_hours": slo,
        "limit": limit,
    }
    if gpu_type:
        body["gpu_type"] = gpu_type
    if on_demand:
        body["on_demand"] = True
    result = _call(client.post, "/test/placement", body)
    if as_json:
        _print_json(result)
    else:
        stats = result["input_stats"]
        console.print(
            f"{result['model']['name']}: {stats['num_lines']} requests, about "
            f"{stats['total_tokens']} tokens, max_model_len {stats['max_model_len']}, deadline "
            f"{result['slo_deadline_hours']} h"
        )
        if result["placements"]:
            console.print(_placement_table(result["placements"]))
        console.print(
            f"{result['placements_total']} placements, {len(result['dropped'])} dropped "
            "(--json lists the reasons)"
        )
        for warning in result.get("warnings") or []:
            errors.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)
    if not result["placements"]:
        _fail(f"no placement fits: {result.get('reason')}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
