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
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from tandemn import cli_metrics, cli_replicas, cli_web
from tandemn.api_client import LOCAL_STATE_DIR, ApiClient, ApiError, local_state_dir
from tandemn.cli_common import (
    TERMINAL_STATUSES,
    ApiUrl,
    GpuType,
    JsonFlag,
    PpSize,
    TpSize,
    _call,
    _client,
    _fail,
    _print_json,
    _print_json_line,
    cli_words,
    console,
    errors,
    key_value_table,
    number_in,
    print_listing,
    valid_id,
)

app = typer.Typer(
    help="Batch LLM inference on GPUs: submit, watch and collect jobs.", no_args_is_help=True
)
local_app = typer.Typer(
    help="Run the whole control plane on this machine (127.0.0.1).", no_args_is_help=True
)
app.add_typer(local_app, name="local")


PID_FILE = LOCAL_STATE_DIR / "stack.pid"
# The running local stack's addresses, for `tandemn deploy --local` and the default API URL.
STACK_FILE = PID_FILE.with_name("stack.json")


def _pid_file() -> Path:
    return local_state_dir() / PID_FILE.name


def _stack_file() -> Path:
    return _pid_file().with_name(STACK_FILE.name)


Solver = typer.Option(
    None,
    "--placement-solver",
    help="'roofline' ranks placements by estimated throughput and cost; 'user_specified' "
    "requires --gpu-type and uses --tp and --pp as given (default: roofline, advisory).",
)
AvgOutputTokens = typer.Option(
    None,
    "--avg-output-tokens",
    min=1,
    help="Expected output per request, in tokens, for the runtime estimate "
    "(default: from the requests' max_tokens).",
)
ModelArchitecture = typer.Option(
    None,
    "--model-architecture",
    help="JSON file with the architecture of a model outside the catalog (Hugging Face "
    "config.json names plus num_parameters), so the solver can plan it.",
)


def _read_architecture(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        _fail(f"--model-architecture {path}: cannot read the file ({error.strerror})")
    except ValueError as error:
        _fail(f"--model-architecture {path} is not valid JSON: {error}")
    if not isinstance(data, dict):
        _fail(f"--model-architecture {path} must hold a JSON object, got {type(data).__name__}")
    return data


def _input_uri(client: ApiClient, input_file: str) -> str:
    """Returns INPUT as an s3:// URI, uploading a local file first."""
    if input_file.startswith("s3://"):
        return input_file
    path = Path(input_file)
    if path.is_dir():
        _fail(f"input file {input_file} is a folder; give the path of a JSONL file in it")
    if not path.is_file():
        _fail(f"input file {input_file} not found; give a path to a JSONL file or an s3:// URI")
    return _call(client.upload, path)


def _set_present(body: dict[str, Any], **fields: Any) -> dict[str, Any]:
    body.update({name: value for name, value in fields.items() if value is not None})
    return body


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
        1000,
        "--chunk-size",
        min=1,
        help="Requests (input lines) per chunk, the unit of work a replica leases.",
    ),
    max_output_tokens: int | None = typer.Option(
        None, "--max-output-tokens", min=1, help="Cap on each request's max_tokens, in tokens."
    ),
    avg_output_tokens: int | None = AvgOutputTokens,
    slo: float = typer.Option(
        4.0,
        "--slo",
        callback=number_in(0.01, 720),
        help="Deadline for the whole job, in hours (0.01 to 720).",
    ),
    placement_solver: str | None = Solver,
    gpu_type: str | None = GpuType,
    tp: int | None = TpSize,
    pp: int | None = PpSize,
    on_demand: bool = typer.Option(
        False, "--on-demand", help="On-demand instances only (default: spot first, then on-demand)."
    ),
    persist: bool = typer.Option(
        False, "--persist", help="Keep the instances running after the job ends."
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Accept a user-specified placement that the solver finds infeasible.",
    ),
    model_architecture: Path | None = ModelArchitecture,
    description: str | None = typer.Option(
        None, "--description", help="Free text stored with the job (at most 2000 characters)."
    ),
    user_id: str | None = typer.Option(
        None, "--user-id", help="Owner recorded on the job (at most 128 characters)."
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
    as_json: bool = typer.Option(
        False,
        "--json",
        help="Print the API's JSON on one line; with --wait, then one line per progress change.",
    ),
) -> None:
    """Upload INPUT (if local) and submit it as a batch job."""
    if local and api_url is None:
        api_url = _local_stack_url()
    architecture = _read_architecture(model_architecture)
    client = _client(api_url)
    body: dict[str, Any] = {
        "model_name": model,
        "input_file": _input_uri(client, input_file),
        "chunk_size": chunk_size,
        "slo_deadline_hours": slo,
    }
    _set_present(
        body,
        replicas=replicas,
        max_output_tokens=max_output_tokens,
        avg_output_tokens=avg_output_tokens,
        placement_solver=placement_solver,
        gpu_type=gpu_type,
        tp_size=tp,
        pp_size=pp,
        model_architecture=architecture,
        description=description,
        user_id=user_id,
    )
    for name, flag in (("on_demand", on_demand), ("persist", persist), ("force", force)):
        if flag:
            body[name] = True
    submitted = _call(
        client.post, "/submit/batch", body, local_names={body["input_file"]: input_file}
    )
    if as_json:
        _print_json_line(submitted)
    else:
        console.print(
            f"job [bold]{submitted['job_id']}[/bold] {submitted['status']}: "
            f"{submitted.get('chunks', 0)} chunks, replicas {', '.join(submitted.get('replicas') or []) or 'none yet'}"
        )
        for key in ("placement_warning", "replica_warning"):
            if submitted.get(key):
                errors.print(
                    f"[yellow]warning:[/yellow] {cli_words(submitted[key])}",
                    highlight=False,
                    soft_wrap=True,
                )
    if wait:
        final = _follow_command(client, submitted["job_id"], as_json=as_json)
        raise typer.Exit(0 if final["status"] == "succeeded" else 1)


def _local_stack_url() -> str:
    """Returns the API URL that `tandemn local up` recorded, failing when no stack runs."""
    if not _stack_file().exists() or not _pid_file().exists():
        _fail("no local stack is running; start one with `tandemn local up`")
    return json.loads(_stack_file().read_text())["api_url"]


def _print_jobs(jobs: list[dict[str, Any]]) -> None:
    rows = [
        [
            job["job_id"],
            job["status"],
            f"{100 * job.get('progress', 0):.1f}%",
            str(job.get("model_name")),
            str(job.get("num_lines", 0)),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.get("created_at") or 0)),
        ]
        for job in jobs
    ]
    print_listing(["job", "status", "progress", "model", "requests", "created"], rows)


@app.command()
def status(
    job_id: str | None = typer.Argument(None, callback=valid_id, help="Job to show; omit to list recent jobs."),
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
            _print_jobs(listing["jobs"])
        return
    job = _call(client.get, f"/job/{job_id}")
    if as_json:
        _print_json(job)
        return
    chunks = job["chunks"]
    table = key_value_table()
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
        ("deadline", _deadline_cell(job.get("deadline"))),
        ("output", job.get("output_file") or job.get("output_location")),
    ):
        table.add_row(label, str(value))
    for label, key in (("failure reason", "failure_reason"), ("cancel reason", "cancel_reason")):
        if job.get(key):
            table.add_row(label, str(job[key]))
    if job.get("validation_errors"):
        for error in job["validation_errors"]:
            table.add_row("input error", error["message"])
    console.print(table)
    for warning in job.get("warnings") or []:
        errors.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)


def _deadline_cell(deadline: dict[str, Any] | None) -> str:
    if not deadline:
        return "-"
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(deadline["deadline_at"]))
    if "missed_by_sec" in deadline:
        missed = deadline["missed_by_sec"]
        return f"{when} (missed by {missed / 3600:.2f} h)" if missed else f"{when} (met)"
    if deadline.get("overdue_sec"):
        return f"{when} (passed {deadline['overdue_sec'] / 3600:.2f} h ago)"
    return f"{when} (at risk)" if deadline.get("at_risk") else when


def _follow_json(client: ApiClient, job_id: str, interval: float) -> dict[str, Any]:
    """Prints the job's JSON on one line whenever its status or progress changes, until it ends."""
    last = None
    while True:
        job = _call(client.get, f"/job/{job_id}")
        seen = (job["status"], job.get("requests_done"), json.dumps(job.get("chunks")))
        if seen != last:
            _print_json_line(job)
            last = seen
        if job["status"] in TERMINAL_STATUSES:
            return job
        time.sleep(interval)


class _Rate:
    """Output tokens per second and the ETA, averaged since the command started following."""

    def __init__(self) -> None:
        self.first: tuple[float, int] | None = None

    def texts(self, job: dict[str, Any], total: int, done: int) -> tuple[str, str]:
        # Replicas report tokens when a chunk completes, so a short window would often show
        # none; the rate is the average since this command started following.
        now, tokens = time.monotonic(), int(job.get("generation_tokens_total") or 0)
        if self.first is None:
            self.first = (now, tokens)
            return "- tok/s", "-"
        if now <= self.first[0]:
            return "- tok/s", "-"
        rate = (tokens - self.first[1]) / (now - self.first[0])
        eta = "-"
        if done > 0 and rate > 0 and tokens > 0:
            eta = f"{(total - done) * tokens / done / rate:.0f}s"
        return f"{rate:.0f} tok/s", eta


def _follow(
    client: ApiClient, job_id: str, interval: float = 1.0, *, as_json: bool = False
) -> dict[str, Any]:
    """Shows the job's progress (requests done, output tokens/s, ETA) until it ends.

    A terminal gets a progress bar, and other output (a log file) gets a line at each change.
    """
    if as_json:
        return _follow_json(client, job_id, interval)
    if console.is_terminal:
        job = _follow_bar(client, job_id, interval)
    else:
        job = _follow_lines(client, job_id, interval)
    summary = f"job {job_id} {job['status']}"
    if job.get("requests_succeeded") is not None:
        summary += f": {job['requests_succeeded']} succeeded, {job['requests_failed']} failed"
    if job.get("failure_reason"):
        summary += f" ({job['failure_reason']})"
    if job.get("cancel_reason"):
        summary += f" ({job['cancel_reason']})"
    console.print(summary)
    return job


def _follow_command(
    client: ApiClient, job_id: str, interval: float = 1.0, *, as_json: bool = False
) -> dict[str, Any]:
    """Follows a job for a command. Ctrl-C stops following, not the job, and prints how to resume."""
    try:
        return _follow(client, job_id, interval, as_json=as_json)
    except KeyboardInterrupt:
        errors.print(
            f"stopped following job {job_id}; the job keeps running. `tandemn status {job_id}` "
            f"shows it and `tandemn destroy {job_id}` cancels it",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        raise typer.Exit(130) from None


def _follow_bar(client: ApiClient, job_id: str, interval: float) -> dict[str, Any]:
    rate = _Rate()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} requests"),
        TextColumn("{task.fields[rate]}"),
        TextColumn("ETA {task.fields[eta]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(job_id, total=1, rate="- tok/s", eta="-")
        while True:
            job = _call(client.get, f"/job/{job_id}")
            total = max(int(job.get("num_lines") or 0), 1)
            done = int(job.get("requests_done") or 0)
            rate_text, eta_text = rate.texts(job, total, done)
            progress.update(
                task,
                total=total,
                completed=done,
                rate=rate_text,
                eta=eta_text,
                description=f"{job_id} {job['status']}",
            )
            if job["status"] in TERMINAL_STATUSES:
                return job
            time.sleep(interval)


def _follow_lines(client: ApiClient, job_id: str, interval: float) -> dict[str, Any]:
    rate = _Rate()
    last = None
    while True:
        job = _call(client.get, f"/job/{job_id}")
        total = max(int(job.get("num_lines") or 0), 1)
        done = int(job.get("requests_done") or 0)
        rate_text, eta_text = rate.texts(job, total, done)
        if (job["status"], done) != last:
            console.print(
                f"{time.strftime('%H:%M:%S')} job {job_id} {job['status']}: {done}/{total} "
                f"requests, {rate_text}, ETA {eta_text}",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
            last = (job["status"], done)
        if job["status"] in TERMINAL_STATUSES:
            return job
        time.sleep(interval)


@app.command()
def progress(
    job_id: str = typer.Argument(..., callback=valid_id, help="Job to follow."),
    interval: float = typer.Option(
        1.0, "--interval", callback=number_in(0.2), help="Seconds between polls of the job."
    ),
    api_url: str | None = ApiUrl,
    as_json: bool = typer.Option(
        False,
        "--json",
        help="Print the job's JSON on one line at each change instead of a progress bar.",
    ),
) -> None:
    """Follow a job with a progress bar until it ends (requests done, output tokens/s, ETA).

    Exits 0 when the job succeeded and 1 otherwise.
    """
    final = _follow_command(_client(api_url), job_id, interval, as_json=as_json)
    raise typer.Exit(0 if final["status"] == "succeeded" else 1)


OutputPath = typer.Option(
    None,
    "-o",
    "--output",
    help="Where to write the output: a folder gets output.jsonl and errors.jsonl, a file path "
    "gets its errors beside it as NAME.errors.jsonl (default out/JOB/).",
)


@app.command()
def download(
    job_id: str = typer.Argument(..., callback=valid_id, help="Finished job whose output to fetch."),
    output: Path | None = OutputPath,
    api_url: str | None = ApiUrl,
    as_json: bool = typer.Option(
        False, "--json", help="Print the paths and sizes (bytes) written as JSON."
    ),
) -> None:
    """Download a finished job's output.jsonl and errors.jsonl."""
    client = _client(api_url)
    links = _call(client.get, f"/job/{job_id}/output")
    destination, errors_path = _download_paths(output or Path("out") / job_id)
    sizes = {}
    # The bar goes to stderr and disappears when done, so stdout holds only the result.
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=errors,
        transient=True,
        disable=as_json,
    ) as bar:
        for url, path in ((links["output_url"], destination), (links["error_url"], errors_path)):
            task = bar.add_task(path.name, total=None)

            def advance(written: int, total: int | None, task=task) -> None:
                bar.update(task, completed=written, total=total)

            sizes[path] = _call(client.download, url, path, advance)
    if as_json:
        _print_json(
            {
                "job_id": job_id,
                "status": links.get("status"),
                "output": str(destination),
                "output_bytes": sizes[destination],
                "errors": str(errors_path),
                "errors_bytes": sizes[errors_path],
            }
        )
        return
    console.print(
        f"wrote {destination} ({sizes[destination]} bytes) and {errors_path} "
        f"({sizes[errors_path]} bytes)"
    )


def _download_paths(output: Path) -> tuple[Path, Path]:
    """Returns where the output and errors files go for ``-o output``.

    A folder (one that exists, or a path ending in a separator) gets output.jsonl and
    errors.jsonl. Any other path is the output file, and its errors file is named after it, so
    two jobs downloaded into one folder under different names do not overwrite each other.
    """
    if output.is_dir() or str(output).endswith(os.sep):
        return output / "output.jsonl", output / "errors.jsonl"
    if output.name == "output.jsonl":
        return output, output.with_name("errors.jsonl")
    return output, output.with_name(f"{output.stem}.errors.jsonl")


def _active_jobs(client: ApiClient) -> list[dict[str, Any]]:
    """Returns every job that can still be cancelled, paging through `GET /jobs`."""
    # NOTE: this reads every job, finished ones too, because the API lists no active jobs alone.
    found: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 200}
    while True:
        page = _call(client.get, "/jobs", params)
        found.extend(
            job
            for job in page["jobs"]
            if job["status"] not in TERMINAL_STATUSES and job["status"] != "assembling"
        )
        if not page.get("next_token"):
            return found
        params["next_token"] = page["next_token"]


def _cancel_all(client: ApiClient, reason: str | None, yes: bool, as_json: bool) -> None:
    active = _active_jobs(client)
    if not active:
        if as_json:
            _print_json({"cancelled": [], "skipped": [], "failed": []})
        else:
            console.print("no active job to cancel")
        return
    if not yes:
        listing = ", ".join(f"{job['job_id']} ({job['status']})" for job in active)
        typer.confirm(f"Cancel {len(active)} active jobs: {listing}?", abort=True, err=True)
    body = {"reason": reason} if reason else {}
    cancelled: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    with Progress(
        TextColumn("cancelling"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} jobs"),
        console=errors,
        transient=True,
        disable=as_json,
    ) as bar:
        task = bar.add_task("cancel", total=len(active))
        for job in active:
            try:
                cancelled.append(client.post(f"/job/{job['job_id']}/cancel", body))
            except ApiError as error:
                # A job that ended or started assembling since the listing returns 409.
                entry = {"job_id": job["job_id"], "message": str(error)}
                (skipped if error.status_code == 409 else failed).append(entry)
            bar.advance(task)
    if as_json:
        _print_json({"cancelled": cancelled, "skipped": skipped, "failed": failed})
    else:
        for result in cancelled:
            console.print(_cancel_summary(result), highlight=False, markup=False, soft_wrap=True)
        for entry in skipped:
            console.print(
                f"skipped {entry['job_id']}: {entry['message']}",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
        for entry in failed:
            errors.print(
                f"[red]error:[/red] {entry['job_id']}: {entry['message']}",
                highlight=False,
                soft_wrap=True,
            )
    if failed:
        raise typer.Exit(1)


def _cancel_summary(result: dict[str, Any]) -> str:
    stopped = ", ".join(result["stopped_replicas"]) or "none"
    chunks = result["chunks"]
    return (
        f"job {result['job_id']} {result['status']} (was {result['previous_status']}): "
        f"replicas stopped: {stopped}; {chunks['completed']} of {chunks['total']} chunks had "
        f"completed; their records go into the job's output, which `tandemn download "
        f"{result['job_id']}` fetches once the teardown has assembled it"
    )


@app.command()
def destroy(
    job_id: str | None = typer.Argument(
        None, callback=valid_id, metavar="JOB", help="Job to cancel (leave it out with --all)."
    ),
    all_jobs: bool = typer.Option(
        False, "--all", help="Cancel every job that has not ended (asks first, unless --yes)."
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation with --all."),
    reason: str | None = typer.Option(
        None,
        "--reason",
        help="Why the job is cancelled, stored on the job (at most 500 characters).",
    ),
    api_url: str | None = ApiUrl,
    as_json: bool = typer.Option(
        False, "--json", help="Print the API's JSON instead of a summary."
    ),
) -> None:
    """Cancel a job, or every active job: its replicas stop and no more chunks are handed out.

    Completed chunks keep their outputs in S3. A job that already ended is an error (exit 1).
    """
    if (job_id is None) == (not all_jobs):
        _fail("give one JOB to cancel, or --all to cancel every active job", code=2)
    client = _client(api_url)
    if all_jobs:
        _cancel_all(client, reason, yes, as_json)
        return
    result = _call(client.post, f"/job/{job_id}/cancel", {"reason": reason} if reason else {})
    if as_json:
        _print_json(result)
        return
    if result["already_cancelled"]:
        stopped = ", ".join(result["stopped_replicas"])
        extra = f"; stopped the replicas still running: {stopped}" if stopped else ""
        console.print(f"job {job_id} was already cancelled{extra}", highlight=False)
        return
    console.print(_cancel_summary(result), highlight=False, markup=False, soft_wrap=True)


def _running_stack() -> tuple[int, str] | None:
    """Returns the pid and API URL of the stack recorded in the state folder, if it still runs."""
    try:
        pid = int(_pid_file().read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    if not _is_stack_process(pid):
        return None
    try:
        url = json.loads(_stack_file().read_text())["api_url"]
    except (OSError, ValueError, KeyError):
        url = "unknown"
    return pid, url


def _is_stack_process(pid: int) -> bool:
    """Returns whether ``pid`` runs `tandemn local up`, so a stale pid that the system gave to
    another process since is neither reported as a stack nor sent a signal. Where /proc is
    missing the pid is trusted."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return not Path("/proc").is_dir()
    return b"tandemn" in command and b"local" in command


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
        10.0, "--watchdog-seconds", callback=number_in(0.5), help="Seconds between watchdog passes."
    ),
    lease_seconds: int | None = typer.Option(
        None, "--lease-seconds", min=5, help="Chunk lease length in seconds (default 300)."
    ),
    engine_threads: int | None = typer.Option(
        None, "--engine-threads", min=1, help="CPU threads of each llama-server (default: half the cores)."
    ),
) -> None:
    """Start the local stack in the foreground; Ctrl-C stops it and every replica.

    Its pid and address go to .cache/local/, or to $TANDEMN_LOCAL_STATE_DIR when set.
    """
    from tandemn import engine_paths
    from tandemn.stack import LocalStack, StackOptions

    running = _running_stack()
    if running is not None:
        pid, url = running
        _fail(
            f"a local stack is already running (pid {pid}, API {url}) and records its state in "
            f"{local_state_dir()}; stop it with `tandemn local down`, or give this one a folder "
            "of its own with TANDEMN_LOCAL_STATE_DIR"
        )
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
        with errors.status("starting the local stack (moto, tables, state machines, API)"):
            stack.start()
    except (RuntimeError, TimeoutError) as error:
        _fail(str(error))
    _pid_file().parent.mkdir(parents=True, exist_ok=True)
    _pid_file().write_text(str(os.getpid()))
    _stack_file().write_text(json.dumps({"api_url": stack.api_url, "moto_url": stack.moto_url}))
    console.print(
        f"local stack up: API {stack.api_url}, moto {stack.moto_url}, engine {engine}; Ctrl-C stops it"
    )
    try:
        while not stopping["now"]:
            time.sleep(0.2)
    finally:
        console.print("stopping the local stack")
        stack.stop()
        # Another stack may have started since and written its own pid: leave its files.
        pid_file = _pid_file()
        if pid_file.exists() and pid_file.read_text().strip() == str(os.getpid()):
            pid_file.unlink(missing_ok=True)
            _stack_file().unlink(missing_ok=True)


@local_app.command("down")
def local_down(
    timeout: float = typer.Option(
        60.0, "--timeout", callback=number_in(0), help="Seconds to wait for the stack to stop."
    ),
) -> None:
    """Stop a local stack started by `tandemn local up`."""
    if not _pid_file().exists():
        console.print("no local stack is running")
        return
    pid = int(_pid_file().read_text().strip())
    if not _is_stack_process(pid):
        _pid_file().unlink(missing_ok=True)
        console.print("no local stack is running (removed a stale pid file)")
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        _pid_file().unlink(missing_ok=True)
        console.print("no local stack is running (removed a stale pid file)")
        return
    deadline = time.monotonic() + timeout
    with errors.status(f"waiting for the local stack (pid {pid}) to stop its replicas and exit"):
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            _fail(f"local stack (pid {pid}) did not stop within {timeout:.0f} s")
    console.print("local stack stopped")


# metrics, stream, history, inspect and timeseries.
cli_metrics.register(app)
# add, kill, swap and replicas.
cli_replicas.register(app)
# web: the dashboard in a browser.
cli_web.register(app)


PLACEMENT_COLUMNS = (
    *("#", "instance", "GPU", "tp", "pp", "replicas", "market", "region"),
    *("tokens/s", "$/h", "$/M tokens", "hours", "deadline"),
)


def _print_placements(placements: list[dict[str, Any]]) -> None:
    rows = [
        [
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
        ]
        for p in placements
    ]
    print_listing(list(PLACEMENT_COLUMNS), rows)


@app.command()
def plan(
    model: str = typer.Argument(..., help="Model name, e.g. meta-llama/Llama-3.1-8B-Instruct."),
    input_file: str = typer.Argument(
        ...,
        metavar="INPUT",
        help="JSONL file of OpenAI batch requests: a local path (uploaded first) or s3://bucket/key.",
    ),
    slo: float = typer.Option(
        4.0,
        "--slo",
        callback=number_in(0.01, 720),
        help="Deadline for the whole job, in hours (0.01 to 720).",
    ),
    placement_solver: str | None = Solver,
    gpu_type: str | None = typer.Option(
        None, "--gpu-type", help="Only this GPU type, e.g. L4, L40S, A100, H100, H200, B200."
    ),
    tp: int | None = TpSize,
    pp: int | None = PpSize,
    max_output_tokens: int | None = typer.Option(
        None, "--max-output-tokens", min=1, help="Cap on each request's max_tokens, in tokens."
    ),
    avg_output_tokens: int | None = AvgOutputTokens,
    model_architecture: Path | None = ModelArchitecture,
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
    architecture = _read_architecture(model_architecture)
    client = _client(api_url)
    body: dict[str, Any] = {
        "model_name": model,
        "input_file": _input_uri(client, input_file),
        "slo_deadline_hours": slo,
        "limit": limit,
    }
    _set_present(
        body,
        placement_solver=placement_solver,
        gpu_type=gpu_type or None,
        tp_size=tp,
        pp_size=pp,
        max_output_tokens=max_output_tokens,
        avg_output_tokens=avg_output_tokens,
        model_architecture=architecture,
    )
    if on_demand:
        body["on_demand"] = True
    result = _call(
        client.post, "/test/placement", body, local_names={body["input_file"]: input_file}
    )
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
            _print_placements(result["placements"])
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
