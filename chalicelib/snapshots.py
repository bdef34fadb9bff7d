"""Metric snapshots of replicas and jobs: pure functions over the samples replicas send.

A replica's sidecar sends counter deltas, gauge values and histogram bucket deltas under the
canonical names below (``vllm:`` prefix and ``_total`` suffix removed). The control plane adds the
deltas into one cumulative *sample* per replica; a sample is also what each timeseries row holds:

``{replica_id, timestamp, updated_at, mode, counters, gauges, histograms, rates, rate_totals,
gpu_sm_util_pct, gpu_mem_bw_util_pct, per_gpu}``

``histograms`` maps a name to ``{"buckets": {le: cumulative count}, "sum", "count"}`` with ``le``
written by :func:`le_key`. Field names of the rendered snapshots follow the Tandemn System API.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

COUNTERS = (
    "generation_tokens",
    "prompt_tokens",
    "request_success",
    "num_preemptions",
    "prefix_cache_queries",
    "prefix_cache_hits",
    "live_generation_tokens",
    "live_prompt_tokens",
)
GAUGES = (
    "num_requests_running",
    "num_requests_waiting",
    "num_requests_swapped",
    "kv_cache_usage_perc",
    "prefix_cache_hit_rate",
)
# Snapshot field prefix -> histogram name (seconds).
HISTOGRAMS = {
    "ttft_ms": "time_to_first_token_seconds",
    "tpot_ms": "time_per_output_token_seconds",
    "e2e_ms": "e2e_request_latency_seconds",
    "queue_time_ms": "request_queue_time_seconds",
    "prefill_time_ms": "request_prefill_time_seconds",
    "decode_time_ms": "request_decode_time_seconds",
    "inference_time_ms": "request_inference_time_seconds",
}
QUANTILES = {"p50": 0.5, "p95": 0.95, "p99": 0.99}
PER_GPU_SUFFIXES = ("sm_pct", "membw_pct", "mem_gb", "mem_pct")

# Throughput of a replica's snapshot is measured over its samples of about this many seconds.
RATE_WINDOW_SECONDS = 30.0
# A replica whose last sample is older than this (server time) stopped reporting (dead,
# partitioned), so its rates and gauges leave the job snapshot. Its counters stay.
STALE_AFTER_SECONDS = 30.0

SNAPSHOT_FIELDS = (
    "job_id",
    "timestamp",
    "replica_id",
    "avg_generation_throughput_toks_per_s",
    "avg_prompt_throughput_toks_per_s",
    "gpu_cache_usage_perc",
    "num_requests_running",
    "num_requests_waiting",
    "num_requests_swapped",
    "request_success_total",
    "num_preemptions_total",
    "generation_tokens_total",
    "prompt_tokens_total",
    *(f"{prefix}_{name}" for prefix in HISTOGRAMS for name in QUANTILES),
    "prefix_cache_hit_rate",
    "gpu_sm_util_pct",
    "gpu_mem_bw_util_pct",
    "live_gen_tokens_total",
    "live_prompt_tokens_total",
)


def le_key(bound: float | str) -> str:
    """Returns the canonical text of a bucket's upper bound: ``"0.005"``, ``"1.0"``, ``"+Inf"``."""
    value = float(bound)
    return "+Inf" if math.isinf(value) else repr(value)


def _sorted_buckets(buckets: dict[str, float]) -> list[tuple[float, float]]:
    return sorted((float(le), float(count)) for le, count in buckets.items())


def histogram_quantile(q: float, buckets: dict[str, float]) -> float | None:
    """Estimates quantile ``q`` from cumulative buckets, interpolating linearly inside a bucket.

    The first bucket's lower bound is 0. A rank that falls in the ``+Inf`` bucket returns the
    largest finite bound, as Prometheus' ``histogram_quantile`` does. Returns None without samples.
    """
    ordered = _sorted_buckets(buckets)
    if not ordered:
        return None
    total = ordered[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, cumulative in ordered:
        if cumulative >= rank and cumulative > below:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / (cumulative - below)
        if not math.isinf(upper):
            lower = upper
        below = cumulative
    return lower


def merge_histograms(histograms: Iterable[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Adds histograms bucket by bucket.

    Histograms with different bounds (two engine versions) are merged on the union of bounds. At
    a bound it lacks, a histogram contributes the cumulative count of its largest bound below it.
    """
    present = [h for h in histograms if h and h.get("buckets")]
    if not present:
        return None
    bounds = sorted({float(le) for h in present for le in h["buckets"]})
    merged = dict.fromkeys(bounds, 0.0)
    for histogram in present:
        own = _sorted_buckets(histogram["buckets"])
        position, cumulative = 0, 0.0
        for bound in bounds:
            while position < len(own) and own[position][0] <= bound:
                cumulative = own[position][1]
                position += 1
            merged[bound] += cumulative
    return {
        "buckets": {le_key(bound): count for bound, count in merged.items()},
        "sum": sum(float(h.get("sum", 0.0)) for h in present),
        "count": sum(float(h.get("count", 0.0)) for h in present),
    }


def add_histogram(total: dict[str, Any] | None, delta: dict[str, Any]) -> dict[str, Any]:
    """Returns ``total`` plus a histogram delta that has the same or new bounds."""
    buckets = dict((total or {}).get("buckets") or {})
    for le, count in (delta.get("buckets") or {}).items():
        key = le_key(le)
        buckets[key] = float(buckets.get(key, 0.0)) + float(count)
    return {
        "buckets": buckets,
        "sum": float((total or {}).get("sum", 0.0)) + float(delta.get("sum", 0.0)),
        "count": float((total or {}).get("count", 0.0)) + float(delta.get("count", 0.0)),
    }


def _milliseconds(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 3)


def latency_fields(histograms: dict[str, Any]) -> dict[str, float | None]:
    fields: dict[str, float | None] = {}
    for prefix, name in HISTOGRAMS.items():
        buckets = (histograms.get(name) or {}).get("buckets") or {}
        for label, q in QUANTILES.items():
            fields[f"{prefix}_{label}"] = _milliseconds(histogram_quantile(q, buckets))
    return fields


def _number(value: Any) -> float | int | None:
    if value is None:
        return None
    number = float(value)
    return int(number) if number.is_integer() else number


def _sum_present(values: Iterable[Any]) -> float | int | None:
    present = [float(v) for v in values if v is not None]
    return _number(sum(present)) if present else None


def _mean_present(values: Iterable[Any]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return round(sum(present) / len(present), 4) if present else None


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def prefix_cache_hit_rate(counters: dict[str, Any], gauges: Iterable[Any]) -> float | None:
    """Returns prefix-cache hits over queries (in tokens), or the gauge that older vLLM reports."""
    queries = float(counters.get("prefix_cache_queries") or 0.0)
    if queries > 0:
        return round(float(counters.get("prefix_cache_hits") or 0.0) / queries, 4)
    return _mean_present(gauges)


def rate_counter_totals(mode: str, counters: dict[str, Any]) -> tuple[float, float]:
    """Returns the generation and prompt token totals that throughput is measured on.

    In ``client`` mode (an engine without vLLM metrics, such as llama.cpp) these are the token
    counts the sidecar takes from streamed responses, which grow with each token. Otherwise they
    are the engine's counters, or the sidecar's counts when the engine has none.
    """
    live = (
        float(counters.get("live_generation_tokens") or 0.0),
        float(counters.get("live_prompt_tokens") or 0.0),
    )
    if mode == "client" or "generation_tokens" not in counters:
        return live
    return float(counters["generation_tokens"]), float(counters.get("prompt_tokens") or 0.0)


def rates_from_recent(recent: list[list[float]]) -> dict[str, float | None]:
    """Returns tokens per second between the oldest and newest ``[timestamp, gen, prompt]``."""
    if len(recent) < 2:
        return {"generation": None, "prompt": None}
    first, last = recent[0], recent[-1]
    seconds = float(last[0]) - float(first[0])
    if seconds <= 0:
        return {"generation": None, "prompt": None}
    return {
        "generation": max(0.0, (float(last[1]) - float(first[1])) / seconds),
        "prompt": max(0.0, (float(last[2]) - float(first[2])) / seconds),
    }


def trim_recent(recent: list[list[float]]) -> list[list[float]]:
    """Keeps the entries of the last RATE_WINDOW_SECONDS, and always the two newest."""
    if len(recent) <= 2:
        return recent
    newest = float(recent[-1][0])
    kept = [entry for entry in recent[:-2] if newest - float(entry[0]) <= RATE_WINDOW_SECONDS]
    return kept + recent[-2:]


def apply_snapshot(sample: dict[str, Any], snapshot: dict[str, Any], now: float) -> dict[str, Any]:
    """Returns the replica's sample after one snapshot of deltas from its sidecar."""
    counters = dict(sample.get("counters") or {})
    for name, delta in (snapshot.get("counters") or {}).items():
        if name in COUNTERS:
            counters[name] = float(counters.get(name, 0.0)) + float(delta)
    histograms = dict(sample.get("histograms") or {})
    for name, delta in (snapshot.get("histograms") or {}).items():
        if name in HISTOGRAMS.values():
            histograms[name] = add_histogram(histograms.get(name), delta)
    mode = snapshot.get("mode") or "engine"
    generation_total, prompt_total = rate_counter_totals(mode, counters)
    timestamp = float(snapshot["timestamp"])
    recent = list(sample.get("recent") or [])
    if recent and float(recent[-1][0]) >= timestamp:
        # A replica clock that went backwards restarts the rate window instead of dividing by 0.
        recent = []
    recent = trim_recent([*recent, [timestamp, generation_total, prompt_total]])
    return {
        **sample,
        "timestamp": timestamp,
        "updated_at": now,
        "mode": mode,
        "engine": snapshot.get("engine") or sample.get("engine"),
        "counters": counters,
        # Gauges and GPU readings are replaced: a value the engine stopped reporting disappears.
        "gauges": {k: v for k, v in (snapshot.get("gauges") or {}).items() if k in GAUGES},
        "histograms": histograms,
        "gpu_sm_util_pct": snapshot.get("gpu_sm_util_pct"),
        "gpu_mem_bw_util_pct": snapshot.get("gpu_mem_bw_util_pct"),
        "per_gpu": dict(snapshot.get("per_gpu") or {}),
        "recent": recent,
        "rates": rates_from_recent(recent),
        "rate_totals": {"generation": generation_total, "prompt": prompt_total},
    }


def replica_snapshot(job_id: str, sample: dict[str, Any]) -> dict[str, Any]:
    """Renders one replica's sample as the per-replica snapshot, with its per-GPU keys."""
    counters = sample.get("counters") or {}
    gauges = sample.get("gauges") or {}
    rates = sample.get("rates") or {}
    snapshot: dict[str, Any] = {
        "job_id": job_id,
        "timestamp": sample.get("timestamp"),
        "replica_id": sample.get("replica_id"),
        "avg_generation_throughput_toks_per_s": _round(rates.get("generation")),
        "avg_prompt_throughput_toks_per_s": _round(rates.get("prompt")),
        "gpu_cache_usage_perc": _number(gauges.get("kv_cache_usage_perc")),
        "num_requests_running": _number(gauges.get("num_requests_running")),
        "num_requests_waiting": _number(gauges.get("num_requests_waiting")),
        "num_requests_swapped": _number(gauges.get("num_requests_swapped")),
        "request_success_total": _number(counters.get("request_success")),
        "num_preemptions_total": _number(counters.get("num_preemptions")),
        "generation_tokens_total": _number(counters.get("generation_tokens")),
        "prompt_tokens_total": _number(counters.get("prompt_tokens")),
        **latency_fields(sample.get("histograms") or {}),
        "prefix_cache_hit_rate": prefix_cache_hit_rate(
            counters, [gauges.get("prefix_cache_hit_rate")]
        ),
        "gpu_sm_util_pct": _number(sample.get("gpu_sm_util_pct")),
        "gpu_mem_bw_util_pct": _number(sample.get("gpu_mem_bw_util_pct")),
        "live_gen_tokens_total": _number(counters.get("live_generation_tokens")),
        "live_prompt_tokens_total": _number(counters.get("live_prompt_tokens")),
    }
    for key, value in sorted((sample.get("per_gpu") or {}).items()):
        snapshot[key] = _number(value)
    return snapshot


def is_fresh(sample: dict[str, Any], now: float) -> bool:
    return now - float(sample.get("updated_at") or 0.0) <= STALE_AFTER_SECONDS


def sum_counters(samples: Iterable[dict[str, Any]]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for sample in samples:
        for name, value in (sample.get("counters") or {}).items():
            totals[name] = totals.get(name, 0.0) + float(value)
    return totals


def merge_all_histograms(samples: list[dict[str, Any]]) -> dict[str, Any]:
    merged = {}
    for name in HISTOGRAMS.values():
        histogram = merge_histograms((s.get("histograms") or {}).get(name) for s in samples)
        if histogram is not None:
            merged[name] = histogram
    return merged


def job_snapshot(
    job_id: str,
    samples: list[dict[str, Any]],
    retired: dict[str, Any] | None,
    now: float,
    fresh_ids: set[str] | None = None,
) -> dict[str, Any]:
    """Aggregates the samples of a job's replicas into the job snapshot.

    Counters and histograms are summed over every sample plus ``retired`` (the counters and
    histograms of replicas that finished). Rates and the request gauges are summed, and KV cache
    and GPU utilisation averaged, over fresh samples only: those updated within
    STALE_AFTER_SECONDS of ``now``, or those whose replica id is in ``fresh_ids`` when given.
    Latency quantiles come from the merged histograms.
    """
    fresh = [
        s
        for s in samples
        if (s.get("replica_id") in fresh_ids if fresh_ids is not None else is_fresh(s, now))
    ]
    everything = [*samples, *([retired] if retired else [])]
    counters = sum_counters(everything)
    present = {name for s in everything for name in (s.get("counters") or {})}

    def counter(name: str) -> float | int | None:
        return _number(counters[name]) if name in present else None

    def fresh_gauges(name: str) -> list[Any]:
        return [(s.get("gauges") or {}).get(name) for s in fresh]

    timestamps = [float(s["timestamp"]) for s in samples if s.get("timestamp") is not None]
    snapshot = {
        "job_id": job_id,
        "timestamp": max(timestamps) if timestamps else (retired or {}).get("timestamp"),
        "replica_id": None,
        "avg_generation_throughput_toks_per_s": _round(
            _sum_present((s.get("rates") or {}).get("generation") for s in fresh)
        ),
        "avg_prompt_throughput_toks_per_s": _round(
            _sum_present((s.get("rates") or {}).get("prompt") for s in fresh)
        ),
        "gpu_cache_usage_perc": _mean_present(fresh_gauges("kv_cache_usage_perc")),
        "num_requests_running": _sum_present(fresh_gauges("num_requests_running")),
        "num_requests_waiting": _sum_present(fresh_gauges("num_requests_waiting")),
        "num_requests_swapped": _sum_present(fresh_gauges("num_requests_swapped")),
        "request_success_total": counter("request_success"),
        "num_preemptions_total": counter("num_preemptions"),
        "generation_tokens_total": counter("generation_tokens"),
        "prompt_tokens_total": counter("prompt_tokens"),
        **latency_fields(merge_all_histograms(everything)),
        "prefix_cache_hit_rate": prefix_cache_hit_rate(
            counters, fresh_gauges("prefix_cache_hit_rate")
        ),
        "gpu_sm_util_pct": _mean_present(s.get("gpu_sm_util_pct") for s in fresh),
        "gpu_mem_bw_util_pct": _mean_present(s.get("gpu_mem_bw_util_pct") for s in fresh),
        "live_gen_tokens_total": counter("live_generation_tokens"),
        "live_prompt_tokens_total": counter("live_prompt_tokens"),
    }
    return snapshot


def fold_into_retired(
    retired: dict[str, Any] | None, sample: dict[str, Any], replica_id: str
) -> dict[str, Any]:
    """Adds a finished replica's counters and histograms to the job's retired totals."""
    base = retired or {"counters": {}, "histograms": {}, "retired_replicas": []}
    counters = sum_counters([base, sample])
    histograms = dict(base.get("histograms") or {})
    for name, histogram in (sample.get("histograms") or {}).items():
        histograms[name] = merge_histograms([histograms.get(name), histogram]) or histogram
    return {
        **base,
        "counters": counters,
        "histograms": histograms,
        "timestamp": max(float(base.get("timestamp") or 0.0), float(sample.get("timestamp") or 0)),
        "retired_replicas": sorted({*base.get("retired_replicas", []), replica_id}),
    }


def aggregate_series(job_id: str, rows: list[dict[str, Any]], step: float) -> list[dict[str, Any]]:
    """Builds job-level rows from per-replica timeseries rows, one per ``step`` seconds.

    At each step the latest row of every replica so far takes part. A replica whose latest row
    is older than max(STALE_AFTER_SECONDS, 2 * step) keeps its counters but not its rates.
    """
    ordered = sorted(rows, key=lambda r: float(r["timestamp"]))
    if not ordered:
        return []
    stale_after = max(STALE_AFTER_SECONDS, 2 * step)

    def step_end(timestamp: float) -> float:
        return math.floor(timestamp / step) * step + step

    latest: dict[str, dict[str, Any]] = {}
    series: list[dict[str, Any]] = []
    boundary = step_end(float(ordered[0]["timestamp"]))
    for row in ordered:
        timestamp = float(row["timestamp"])
        if timestamp >= boundary:
            series.append(_aggregate_at(job_id, latest, boundary, stale_after))
            # Steps without rows are skipped, not repeated.
            boundary = step_end(timestamp)
        latest[row["replica_id"]] = row
    series.append(_aggregate_at(job_id, latest, boundary, stale_after))
    return series


def _aggregate_at(
    job_id: str, latest: dict[str, dict[str, Any]], at: float, stale_after: float
) -> dict[str, Any]:
    samples = list(latest.values())
    fresh_ids = {
        replica_id
        for replica_id, sample in latest.items()
        if at - float(sample["timestamp"]) <= stale_after
    }
    return job_snapshot(job_id, samples, None, at, fresh_ids=fresh_ids)
