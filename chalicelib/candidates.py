"""Placement candidates of a replica: the ordered list of (GPU, parallelism, region, market) that
the launch state machine tries until one has capacity.

The job's ranked placements (``job["placements"]``, written at submit) come first, in rank order.
A job without placements gets one candidate built from its requested ``gpu_type``, ``tp_size``
and ``pp_size``. Each candidate whose market is not fixed expands to spot first, then on-demand;
each candidate with several regions expands region by region. So a capacity error moves a
replica to the same placement on-demand, then to the next region, then to the next placement.
"""

from __future__ import annotations

from typing import Any

# Keys of a placement that a launch uses. Other keys of a placement entry are ignored.
PLACEMENT_KEYS = ("gpu_type", "instance_type", "tp_size", "pp_size", "region", "market")
MARKETS = ("spot", "on_demand")
# A replica tries at most this many placements, because each failed try costs a RunInstances call.
MAX_CANDIDATES = 24


def _market_of(entry: dict[str, Any]) -> str | None:
    market = entry.get("market")
    if market in MARKETS:
        return market
    if entry.get("on_demand") is True or entry.get("spot") is False:
        return "on_demand"
    if entry.get("spot") is True or entry.get("on_demand") is False:
        return "spot"
    return None


def _regions_of(entry: dict[str, Any]) -> list[str | None]:
    regions = entry.get("regions")
    if isinstance(regions, list) and regions:
        return [str(region) for region in regions]
    region = entry.get("region")
    return [str(region)] if region else [None]


def normalise(entry: dict[str, Any]) -> dict[str, Any]:
    """Keeps the keys a launch uses; ``tp_size`` and ``pp_size`` default to 1."""
    candidate = {key: entry.get(key) for key in ("gpu_type", "instance_type")}
    candidate["tp_size"] = int(entry.get("tp_size") or 1)
    candidate["pp_size"] = int(entry.get("pp_size") or 1)
    return {key: value for key, value in candidate.items() if value is not None}


def expand(entries: list[dict[str, Any]], *, on_demand: bool | None) -> list[dict[str, Any]]:
    """Turns ranked placements into the ordered candidate list (spot first, then the next region).

    ``on_demand`` True keeps on-demand candidates only and False spot only; None expands each
    placement whose market is not fixed into spot, then on-demand.
    """
    result: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    for entry in entries:
        base = normalise(entry)
        fixed_market = _market_of(entry)
        if on_demand is True:
            markets = ["on_demand"]
        elif on_demand is False:
            markets = ["spot"]
        elif fixed_market is not None:
            markets = [fixed_market]
        else:
            markets = list(MARKETS)
        for region in _regions_of(entry):
            for market in markets:
                candidate = {**base, "market": market}
                if region:
                    candidate["region"] = region
                key = tuple(sorted(candidate.items()))
                if key in seen:
                    continue
                seen.add(key)
                result.append(candidate)
    return result[:MAX_CANDIDATES]


def requested_placement(job: dict[str, Any]) -> dict[str, Any]:
    requested = job.get("requested") or {}
    return {
        "gpu_type": requested.get("gpu_type"),
        "tp_size": requested.get("tp_size") or 1,
        "pp_size": requested.get("pp_size") or 1,
    }


def ranked_placements(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Returns the job's ranked placements, or one built from the request when it has none."""
    placements = [p for p in job.get("placements") or [] if isinstance(p, dict)]
    return placements or [requested_placement(job)]


def current_placement(replicas: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Returns the placement of the newest replica that is starting or running, if any."""
    from chalicelib.states import REPLICA_TERMINAL, ReplicaPhase

    live = [
        r
        for r in replicas
        if ReplicaPhase(r["phase"]) not in REPLICA_TERMINAL
        and r["phase"] not in ("dead", "draining", "preempting")
    ]
    if not live:
        return None
    newest = max(live, key=lambda r: (int(r.get("version", 0)), r["replica_id"]))
    placement = {key: newest.get(key) for key in PLACEMENT_KEYS}
    return {key: value for key, value in placement.items() if value is not None}


def for_new_replicas(
    job: dict[str, Any],
    replicas: list[dict[str, Any]],
    overrides: dict[str, Any],
    *,
    on_demand: bool | None,
) -> list[dict[str, Any]]:
    """Builds the candidate list of replicas added by scale or swap.

    Fields given in ``overrides`` (``gpu_type``, ``tp_size``, ``pp_size``) win; missing ones come
    from the job's current replicas, then from the job's request. Without overrides the current
    placement is tried first and the job's ranked placements follow it.
    """
    overridden = {key: value for key, value in overrides.items() if value is not None}
    current = current_placement(replicas)
    if on_demand is None:
        requested_on_demand = (job.get("requested") or {}).get("on_demand")
        on_demand = True if requested_on_demand else None
    if overridden:
        inherited = current or requested_placement(job)
        entry = {
            "gpu_type": overridden.get("gpu_type", inherited.get("gpu_type")),
            "tp_size": overridden.get("tp_size", inherited.get("tp_size")),
            "pp_size": overridden.get("pp_size", inherited.get("pp_size")),
        }
        if "gpu_type" not in overridden and inherited.get("instance_type"):
            same_shape = all(entry[key] == inherited.get(key) for key in ("tp_size", "pp_size"))
            if same_shape:
                entry["instance_type"] = inherited["instance_type"]
        return expand([entry], on_demand=on_demand)
    entries = ranked_placements(job)
    if current is not None:
        # The running placement first, without its market, so spot and on-demand both follow.
        current = {k: v for k, v in current.items() if k != "market"}
        entries = [current, *entries]
    return expand(entries, on_demand=on_demand)
