"""Cost of a job: what its replicas have accrued, the projected total and the time left.

A replica accrues its instance's on-demand hourly price from its registration (when the
provider starts the instance) until it reaches a terminal phase, or until now; killed and
swapped-out replicas keep what they accrued. Local replicas cost 0. The price comes from the
instance catalog ``chalicelib/data/instances.json`` when it exists; an instance type it does not
list (or a missing catalog) leaves the price unknown (null) and the job's ``price_known`` false.
"""

from __future__ import annotations

import json
import logging
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from chalicelib.states import JOB_TERMINAL, REPLICA_TERMINAL, JobStatus, ReplicaPhase

logger = logging.getLogger(__name__)

CATALOG_PATH = Path(__file__).resolve().parent / "data" / "instances.json"
FREE_PROVIDERS = frozenset({"local"})


@lru_cache(maxsize=1)
def _catalog() -> dict[str, Any]:
    """Loads the catalog's instances by type; an absent or unreadable file gives {}."""
    path = CATALOG_PATH
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        logger.warning(
            "instance catalog unreadable", extra={"path": str(path), "error": str(error)}
        )
        return {}
    instances = data.get("instances") if isinstance(data, dict) else None
    return {
        str(entry["instance_type"]): entry
        for entry in instances or []
        if isinstance(entry, dict) and entry.get("instance_type")
    }


def hourly_price(instance_type: str | None, provider: str | None = None) -> float | None:
    """Returns the on-demand price in USD per hour, 0 for local replicas, None when unknown.

    NOTE: spot replicas are priced at the on-demand price, so their cost is an upper bound.
    """
    if provider in FREE_PROVIDERS:
        return 0.0
    if not instance_type:
        return None
    price = (_catalog().get(instance_type) or {}).get("on_demand_usd_per_hour")
    return float(price) if isinstance(price, (int, float)) else None


def replica_cost(replica: dict[str, Any], now: float) -> dict[str, Any]:
    start = float(replica.get("launched_at") or replica.get("created_at") or now)
    ended = ReplicaPhase(replica["phase"]) in REPLICA_TERMINAL
    end = float(replica.get("updated_at") or now) if ended else now
    seconds = max(0.0, end - start)
    price = hourly_price(replica.get("instance_type"), replica.get("provider"))
    return {
        "replica_id": replica["replica_id"],
        "phase": replica["phase"],
        "instance_type": replica.get("instance_type"),
        "market": replica.get("market"),
        "price_per_hour": price,
        "running_seconds": round(seconds, 1),
        "accrued_usd": None if price is None else round(price * seconds / 3600.0, 4),
        "active": not ended,
    }


def remaining_output_tokens(job: dict[str, Any]) -> float | None:
    """Estimates the output tokens still to generate from what finished requests produced.

    The average output per finished request (or the job's ``avg_output_tokens`` before any
    finished) times the requests left, an estimate that assumes the rest are alike.
    """
    total = int(job.get("num_requests") or 0)
    done = int(job.get("live_requests_succeeded", 0)) + int(job.get("live_requests_failed", 0))
    generated = float(job.get("generation_tokens_total") or 0.0)
    left = max(0, total - done)
    if left == 0:
        return 0.0
    if done > 0 and generated > 0:
        return left * generated / done
    average = (job.get("requested") or {}).get("avg_output_tokens")
    return float(left * average) if average else None


def job_cost(
    job: dict[str, Any],
    replicas: list[dict[str, Any]],
    generation_toks_per_s: float | None,
    now: float | None = None,
) -> dict[str, Any]:
    """Builds the ``cost`` object of ``GET /job/{id}`` and of the run report.

    The ETA is the remaining output tokens over the sustained generation throughput; the
    projected total adds the active replicas' hourly prices for that time to the accrued cost.
    """
    now = time.time() if now is None else now
    entries = [replica_cost(r, now) for r in replicas]
    known = [e["accrued_usd"] for e in entries if e["accrued_usd"] is not None]
    price_known = len(known) == len(entries)
    accrued = round(sum(known), 4)
    active = [e for e in entries if e["active"]]
    terminal = JobStatus(job["status"]) in JOB_TERMINAL or job["status"] == "assembling"
    eta: float | None
    remaining = None if terminal else remaining_output_tokens(job)
    if terminal:
        eta = 0.0
    elif remaining is not None and generation_toks_per_s:
        eta = remaining / generation_toks_per_s
    else:
        eta = None
    projected: float | None = None
    active_prices = [e["price_per_hour"] for e in active]
    if eta is not None and price_known and all(p is not None for p in active_prices):
        projected = round(accrued + sum(active_prices) * eta / 3600.0, 4)
    return {
        "currency": "USD",
        "accrued_usd": accrued,
        "price_known": price_known,
        "price_per_hour": round(sum(p for p in active_prices if p is not None), 4),
        "num_running_replicas": len(active),
        "projected_total_usd": projected,
        "eta_sec": None if eta is None else round(eta),
        "remaining_output_tokens_estimate": None if remaining is None else int(remaining),
        "sustained_generation_toks_per_s": generation_toks_per_s,
        "replicas": entries,
    }


def cost_of_job(settings: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Reads the job's replicas and metric samples and returns its ``cost`` object."""
    from chalicelib import metrics_store, replicas, snapshots

    now = time.time()
    samples, _ = metrics_store.job_samples(settings, job["job_id"])
    rates = [
        (s.get("rates") or {}).get("generation") for s in samples if snapshots.is_fresh(s, now)
    ]
    present = [float(r) for r in rates if r is not None]
    throughput = round(sum(present), 2) if present else None
    return job_cost(job, replicas.list_replicas(settings, job["job_id"]), throughput, now)
