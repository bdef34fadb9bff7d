"""CLI commands that change a job's replicas: ``add``, ``kill``, ``swap`` and ``replicas``."""

from __future__ import annotations

import time
from typing import Any

import typer

from tandemn.api_client import ApiClient, ApiError, default_api_url
from tandemn.cli_common import (
    ApiUrl,
    GpuType,
    JsonFlag,
    PpSize,
    TpSize,
    _call,
    _print_json,
    console,
    print_listing,
    valid_id,
)

OnDemand = typer.Option(
    None,
    "--on-demand/--spot",
    help="On-demand or spot instances only (default: spot first, then on-demand).",
)
Force = typer.Option(False, "--force", help="Skip the checks that protect against idle replicas.")
ReplicaIds = typer.Argument(..., callback=valid_id, help="Replica ids, as `tandemn replicas` lists them.")


def _placement(gpu_type: str | None, tp: int | None, pp: int | None, on_demand: bool | None):
    body: dict[str, Any] = {}
    for name, value in (
        ("gpu_type", gpu_type),
        ("tp_size", tp),
        ("pp_size", pp),
        ("on_demand", on_demand),
    ):
        if value is not None:
            body[name] = value
    return body


def add(
    job_id: str = typer.Argument(..., callback=valid_id, help="Job that gets the replicas."),
    count: int = typer.Option(1, "--count", "-n", min=1, max=256, help="Replicas to add."),
    gpu_type: str | None = GpuType,
    tp: int | None = TpSize,
    pp: int | None = PpSize,
    on_demand: bool | None = OnDemand,
    force: bool = Force,
    api_url: str | None = ApiUrl,
    as_json: bool = JsonFlag,
) -> None:
    """Add replicas to a job. Placement fields you leave out come from its current replicas."""
    body = {"count": count, "force": force, **_placement(gpu_type, tp, pp, on_demand)}
    client = ApiClient(api_url or default_api_url())
    result = _call(client.post, f"/job/{job_id}/scale", body)
    if as_json:
        _print_json(result)
        return
    console.print(
        f"job {job_id}: {_count(len(result['new_replicas']), 'replica')} added (version "
        f"{result['version']}): {', '.join(result['new_replicas'])}"
    )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def kill(
    job_id: str = typer.Argument(..., callback=valid_id, help="Job whose replicas to stop."),
    replica_ids: list[str] = ReplicaIds,
    api_url: str | None = ApiUrl,
    as_json: bool = JsonFlag,
) -> None:
    """Stop replicas at once. Their leased chunks go back to the queue without spending retries."""
    client = ApiClient(api_url or default_api_url())
    result = _call(client.post, f"/job/{job_id}/kill", {"replica_ids": replica_ids})
    if as_json:
        _print_json(result)
        return
    console.print(
        f"killed {', '.join(result['killed']) or 'none'}; {result['reclaimed']} chunks returned"
    )
    for skipped in result["skipped"]:
        console.print(f"skipped {skipped['replica_id']}: {skipped['reason']}")
    if not result["killed"]:
        raise typer.Exit(1)
    _warn_if_no_replica_left(client, job_id)


# Phases of a replica that will still pull work.
_WORKING_PHASES = frozenset({"registered", "launching", "loading_model", "model_ready", "running"})
_ENDED_STATUSES = frozenset({"succeeded", "completed_with_errors", "failed", "cancelled"})


def _warn_if_no_replica_left(client: ApiClient, job_id: str) -> None:
    """Warns when the job still has work but no replica that will pull it."""
    try:
        job = client.get(f"/job/{job_id}")
        listed = client.get(f"/job/{job_id}/replicas")["replicas"]
    except ApiError as error:
        console.print(f"[yellow]warning:[/yellow] failed to read the job's replicas after the kill: {error}")
        return
    waiting = int(job["chunks"]["pending"]) + int(job["chunks"]["inflight"])
    working = [r for r in listed if r["phase"] in _WORKING_PHASES]
    if job["status"] in _ENDED_STATUSES or working or waiting == 0:
        return
    console.print(
        f"[yellow]warning:[/yellow] job {job_id} has no working replica left and {waiting} "
        f"chunks waiting; start one with `tandemn add {job_id}`",
        highlight=False,
        soft_wrap=True,
    )


def swap(
    job_id: str = typer.Argument(..., callback=valid_id, help="Job whose replicas to replace."),
    gpu_type: str | None = GpuType,
    tp: int | None = TpSize,
    pp: int | None = PpSize,
    replicas: int | None = typer.Option(
        None, "--replicas", min=1, max=256, help="New replicas (default: as many as run now)."
    ),
    ready_threshold: int | None = typer.Option(
        None,
        "--ready-threshold",
        min=1,
        help="New replicas that must complete a chunk before the old ones drain (default: all).",
    ),
    on_demand: bool | None = OnDemand,
    force: bool = Force,
    cancel: bool = typer.Option(False, "--cancel", help="Abort the swap in progress."),
    api_url: str | None = ApiUrl,
    as_json: bool = JsonFlag,
) -> None:
    """Replace a job's replicas with new ones without losing a request, or cancel a swap."""
    if cancel:
        body: dict[str, Any] = {"cancel": True}
    else:
        body = {"force": force, **_placement(gpu_type, tp, pp, on_demand)}
        if replicas is not None:
            body["num_replicas"] = replicas
        if ready_threshold is not None:
            body["ready_threshold"] = ready_threshold
    client = ApiClient(api_url or default_api_url())
    result = _call(client.post, f"/job/{job_id}/swap", body)
    if as_json:
        _print_json(result)
        return
    if cancel:
        console.print(
            f"job {job_id}: swap version {result['version']} cancelling; the new replicas "
            f"{', '.join(result['new_replicas'])} stop and the old ones stay"
        )
        return
    console.print(
        f"job {job_id}: swap version {result['version']} started; "
        f"{', '.join(result['old_replicas']) or 'no replica'} drain once "
        f"{result['ready_threshold']} of {', '.join(result['new_replicas'])} have completed a chunk"
    )


def replicas_command(
    job_id: str = typer.Argument(..., callback=valid_id, help="Job whose replicas to list."),
    api_url: str | None = ApiUrl,
    as_json: bool = JsonFlag,
) -> None:
    """List a job's replicas: phase, placement and last heartbeat."""
    client = ApiClient(api_url or default_api_url())
    result = _call(client.get, f"/job/{job_id}/replicas")
    if as_json:
        _print_json(result)
        return
    now = time.time()
    rows = []
    for replica in result["replicas"]:
        beat = replica.get("last_heartbeat")
        rows.append(
            [
                replica["replica_id"],
                replica["phase"],
                str(replica.get("provider")),
                str(replica.get("gpu_type") or "-"),
                str(replica.get("tp_size") or "-"),
                str(replica.get("pp_size") or "-"),
                str(replica.get("market") or "-"),
                f"{now - beat:.0f} s ago" if beat else "-",
            ]
        )
    headers = ["replica", "phase", "provider", "GPU", "tp", "pp", "market", "heartbeat"]
    print_listing(headers, rows)


def register(app: typer.Typer) -> None:
    app.command()(add)
    app.command()(kill)
    app.command()(swap)
    app.command("replicas")(replicas_command)
