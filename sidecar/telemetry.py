"""Replica telemetry: engine metrics, client-side latencies and GPU readings, sent as deltas.

Every ``interval`` seconds the sidecar reads the engine's Prometheus ``/metrics`` page, the
latencies and tokens it measured itself, and (with a GPU and ``nvidia-ml-py`` installed) NVML,
and queues one snapshot. A snapshot carries counter and histogram-bucket deltas since the
previous snapshot, the current gauges and GPU utilisation. Queued snapshots go to
``POST /job/{id}/metrics/ingest``. A failed send keeps them for the next one, in a buffer of
``buffer_limit`` snapshots that drops the oldest and counts the drops. When the replica stops,
``close`` sends what is left and posts the replica's summary to
``POST /job/{id}/metrics/summary``, retrying for up to 2 minutes until it is acknowledged.

Both vLLM metric generations are read: ``vllm:gpu_cache_usage_perc`` (V0) and
``vllm:kv_cache_usage_perc`` (V1), counters with and without ``_total``, and series that differ
only in labels (``engine="0"``, ``finished_reason``) are summed. An engine without vLLM's latency
histograms (llama.cpp's ``llama-server``) is measured client-side: the engine client streams its
responses and records time to first token, time per output token and end-to-end latency.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from sidecar.control import ControlPlaneClient, ControlPlaneError, RequestRejected
from sidecar.retry import RetryPolicy

logger = logging.getLogger(__name__)

# Canonical name -> engine sample names (``_total`` removed), the first present wins.
COUNTER_SOURCES: dict[str, tuple[str, ...]] = {
    "generation_tokens": ("vllm:generation_tokens", "llamacpp:tokens_predicted"),
    "prompt_tokens": ("vllm:prompt_tokens", "llamacpp:prompt_tokens"),
    "request_success": ("vllm:request_success",),
    "num_preemptions": ("vllm:num_preemptions",),
    "prefix_cache_queries": ("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries"),
    "prefix_cache_hits": ("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits"),
}
# Canonical name -> (engine sample names, how series of several engines combine).
GAUGE_SOURCES: dict[str, tuple[tuple[str, ...], str]] = {
    "num_requests_running": (("vllm:num_requests_running", "llamacpp:requests_processing"), "sum"),
    "num_requests_waiting": (("vllm:num_requests_waiting", "llamacpp:requests_deferred"), "sum"),
    "num_requests_swapped": (("vllm:num_requests_swapped",), "sum"),
    "kv_cache_usage_perc": (("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"), "mean"),
    "prefix_cache_hit_rate": (("vllm:gpu_prefix_cache_hit_rate",), "mean"),
}
HISTOGRAM_SOURCES: dict[str, tuple[str, ...]] = {
    "time_to_first_token_seconds": ("vllm:time_to_first_token_seconds",),
    "time_per_output_token_seconds": (
        "vllm:time_per_output_token_seconds",
        "vllm:inter_token_latency_seconds",
    ),
    "e2e_request_latency_seconds": ("vllm:e2e_request_latency_seconds",),
    "request_queue_time_seconds": ("vllm:request_queue_time_seconds",),
    "request_prefill_time_seconds": ("vllm:request_prefill_time_seconds",),
    "request_decode_time_seconds": ("vllm:request_decode_time_seconds",),
    "request_inference_time_seconds": ("vllm:request_inference_time_seconds",),
}
# Bucket bounds (seconds) of the latencies measured client-side, the bounds vLLM V1 uses.
CLIENT_BUCKETS: dict[str, tuple[float, ...]] = {
    "time_to_first_token_seconds": (
        0.001,
        0.005,
        0.01,
        0.02,
        0.04,
        0.06,
        0.08,
        0.1,
        0.25,
        0.5,
        0.75,
        1.0,
        2.5,
        5.0,
        7.5,
        10.0,
        20.0,
        40.0,
        80.0,
        160.0,
        640.0,
        2560.0,
    ),
    "time_per_output_token_seconds": (
        0.01,
        0.025,
        0.05,
        0.075,
        0.1,
        0.15,
        0.2,
        0.3,
        0.4,
        0.5,
        0.75,
        1.0,
        2.5,
        5.0,
        7.5,
        10.0,
        20.0,
        40.0,
        80.0,
    ),
    "e2e_request_latency_seconds": (
        0.3,
        0.5,
        0.8,
        1.0,
        1.5,
        2.0,
        2.5,
        5.0,
        10.0,
        15.0,
        20.0,
        30.0,
        40.0,
        50.0,
        60.0,
        120.0,
        240.0,
        480.0,
        960.0,
        1920.0,
        7680.0,
    ),
}
# The ingest route takes at most this many snapshots per request.
MAX_SNAPSHOTS_PER_REQUEST = 50


def le_key(bound: float | str) -> str:
    value = float(bound)
    return "+Inf" if math.isinf(value) else repr(value)


@dataclass
class Histogram:
    """Cumulative bucket counts keyed by :func:`le_key`, plus the sum and count of samples."""

    buckets: dict[str, float] = field(default_factory=dict)
    sum: float = 0.0
    count: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"buckets": dict(self.buckets), "sum": self.sum, "count": self.count}


@dataclass
class Reading:
    """Cumulative values of one moment: counters, gauges and histograms by canonical name."""

    engine: str = "unknown"
    counters: dict[str, float] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=dict)


def parse_engine_metrics(text: str) -> Reading:
    """Reads a Prometheus text page of vLLM (either generation) or llama.cpp."""
    values: dict[str, float] = defaultdict(float)
    series: dict[str, int] = defaultdict(int)
    buckets: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, float] = defaultdict(float)
    engine = "unknown"
    samples = []
    for family in text_string_to_metric_families(text):
        if family.name.startswith("vllm:"):
            engine = "vllm"
        elif family.name.startswith("llamacpp:") and engine == "unknown":
            engine = "llamacpp"
        samples.extend(family.samples)
    # Samples are routed by name, not by the family's declared type: prometheus_client's parser
    # (0.26) starts an untyped family at each ``_created`` line inside a labelled histogram, so
    # the buckets of a second engine arrive in families of type "unknown".
    histogram_bases = {
        s.name[: -len("_bucket")]
        for s in samples
        if s.name.endswith("_bucket") and "le" in s.labels
    }
    for sample in samples:
        name, value = sample.name, float(sample.value)
        if not math.isfinite(value) or name.endswith("_created"):
            continue
        if name.endswith("_bucket") and "le" in sample.labels:
            buckets[name[: -len("_bucket")]][le_key(sample.labels["le"])] += value
            continue
        if name.endswith("_sum") and name[: -len("_sum")] in histogram_bases:
            sums[name[: -len("_sum")]] += value
            continue
        if name.endswith("_count") and name[: -len("_count")] in histogram_bases:
            counts[name[: -len("_count")]] += value
            continue
        base = name.removesuffix("_total")
        values[base] += value
        series[base] += 1
    reading = Reading(engine=engine)
    for canonical, sources in COUNTER_SOURCES.items():
        source = next((s for s in sources if s in values), None)
        if source is not None:
            reading.counters[canonical] = values[source]
    for canonical, (sources, combine) in GAUGE_SOURCES.items():
        source = next((s for s in sources if s in values), None)
        if source is not None:
            value = values[source]
            reading.gauges[canonical] = value / series[source] if combine == "mean" else value
    for canonical, sources in HISTOGRAM_SOURCES.items():
        source = next((s for s in sources if s in buckets), None)
        if source is not None:
            reading.histograms[canonical] = Histogram(
                dict(buckets[source]), sums[source], counts[source]
            )
    return reading


def histogram_quantile(q: float, buckets: dict[str, float]) -> float | None:
    """Quantile ``q`` of cumulative buckets, linear inside a bucket, capped at the largest bound."""
    ordered = sorted((float(le), float(count)) for le, count in buckets.items())
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
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


class ClientMetrics:
    """Latencies and tokens the sidecar measures from its own engine requests.

    ``observe_tokens`` counts one token per streamed content delta as it arrives, as llama.cpp
    sends one token per delta. ``observe_request`` then raises the count to the response's usage
    when the engine sent several tokens in one delta.
    """

    def __init__(self) -> None:
        self.histograms = {
            name: Histogram({le_key(b): 0.0 for b in (*bounds, math.inf)})
            for name, bounds in CLIENT_BUCKETS.items()
        }
        self.counters: dict[str, float] = {
            "live_generation_tokens": 0.0,
            "live_prompt_tokens": 0.0,
            "request_success": 0.0,
        }

    def _observe(self, name: str, seconds: float) -> None:
        histogram = self.histograms[name]
        for le in histogram.buckets:
            if seconds <= float(le):
                histogram.buckets[le] += 1
        histogram.sum += seconds
        histogram.count += 1

    def observe_tokens(self, count: int) -> None:
        self.counters["live_generation_tokens"] += count

    def observe_request(
        self,
        *,
        ok: bool,
        e2e_seconds: float,
        ttft_seconds: float | None,
        streamed_tokens: int,
        usage: dict[str, Any] | None,
    ) -> None:
        """Records one finished request whose ``streamed_tokens`` were already counted live."""
        usage = usage or {}
        completion = usage.get("completion_tokens")
        output_tokens = int(completion) if isinstance(completion, int) else streamed_tokens
        if output_tokens > streamed_tokens:
            self.counters["live_generation_tokens"] += output_tokens - streamed_tokens
        prompt = usage.get("prompt_tokens")
        if isinstance(prompt, int):
            self.counters["live_prompt_tokens"] += prompt
        if not ok:
            return
        self.counters["request_success"] += 1
        self._observe("e2e_request_latency_seconds", e2e_seconds)
        if ttft_seconds is not None:
            self._observe("time_to_first_token_seconds", ttft_seconds)
            if output_tokens > 1:
                self._observe(
                    "time_per_output_token_seconds",
                    max(0.0, e2e_seconds - ttft_seconds) / (output_tokens - 1),
                )

    def reading(self) -> Reading:
        return Reading(
            engine="client",
            counters=dict(self.counters),
            histograms={
                name: Histogram(dict(h.buckets), h.sum, h.count)
                for name, h in self.histograms.items()
            },
        )


class GpuMonitor:
    """NVML readings per GPU; disabled when ``nvidia-ml-py`` or a GPU driver is missing.

    SM utilisation is NVML's ``utilization.gpu`` (percent of time a kernel ran) and memory
    bandwidth utilisation is ``utilization.memory`` (percent of time device memory was read or
    written), both over NVML's last sample period.
    """

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[Any] = []
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            self._handles = [
                pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
            ]
            self._nvml = pynvml
        except Exception as error:  # noqa: BLE001 (ImportError, or any pynvml.NVMLError subclass)
            logger.info("GPU metrics off: NVML is not available", extra={"error": str(error)})
            self._handles = []

    @property
    def available(self) -> bool:
        return bool(self._handles)

    def read(self) -> dict[str, Any]:
        if not self._handles:
            return {}
        per_gpu: dict[str, float] = {}
        sm, bandwidth = [], []
        for index, handle in enumerate(self._handles):
            try:
                rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            except self._nvml.NVMLError as error:
                logger.warning("GPU reading failed", extra={"gpu": index, "error": str(error)})
                continue
            sm.append(float(rates.gpu))
            bandwidth.append(float(rates.memory))
            per_gpu[f"gpu{index}_sm_pct"] = float(rates.gpu)
            per_gpu[f"gpu{index}_membw_pct"] = float(rates.memory)
            per_gpu[f"gpu{index}_mem_gb"] = round(memory.used / 1e9, 2)
            per_gpu[f"gpu{index}_mem_pct"] = round(100.0 * memory.used / max(memory.total, 1), 1)
        if not sm:
            return {}
        return {
            "gpu_sm_util_pct": round(sum(sm) / len(sm), 1),
            "gpu_mem_bw_util_pct": round(sum(bandwidth) / len(bandwidth), 1),
            "per_gpu": per_gpu,
        }

    def close(self) -> None:
        if self._nvml is not None and self._handles:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as error:
                logger.warning("NVML shutdown failed", extra={"error": str(error)})


def _counter_delta(previous: float | None, current: float) -> float:
    if previous is None:
        return 0.0
    # A counter below its previous value was reset (the engine restarted) and counts from 0.
    return current if current < previous else current - previous


def _histogram_delta(previous: Histogram | None, current: Histogram) -> dict[str, Any]:
    if previous is None:
        return Histogram({le: 0.0 for le in current.buckets}).as_dict()
    if current.count < previous.count:
        return current.as_dict()
    return {
        "buckets": {
            le: max(0.0, count - previous.buckets.get(le, 0.0))
            for le, count in current.buckets.items()
        },
        "sum": max(0.0, current.sum - previous.sum),
        "count": current.count - previous.count,
    }


def combine(engine: Reading | None, client: Reading) -> tuple[Reading, str]:
    """Merges the engine's and the sidecar's readings; returns it and the mode.

    The mode is ``engine`` when the engine reports time to first token (vLLM), else ``client``:
    then the sidecar's own latency histograms and success count stand in for the engine's.
    """
    engine = engine or Reading()
    mode = "engine" if "time_to_first_token_seconds" in engine.histograms else "client"
    counters = dict(engine.counters)
    counters["live_generation_tokens"] = client.counters["live_generation_tokens"]
    counters["live_prompt_tokens"] = client.counters["live_prompt_tokens"]
    histograms = dict(engine.histograms)
    if mode == "client":
        counters.setdefault("request_success", client.counters["request_success"])
        for name, histogram in client.histograms.items():
            histograms.setdefault(name, histogram)
    return Reading(engine.engine, counters, dict(engine.gauges), histograms), mode


class SnapshotBuilder:
    """Turns successive cumulative readings into snapshots of deltas, numbered per session."""

    def __init__(self) -> None:
        self.session = secrets.token_hex(8)
        self.seq = 0
        self.previous: Reading | None = None
        self.previous_time: float | None = None
        self.first: Reading | None = None
        self.last: Reading | None = None

    def build(
        self, reading: Reading, mode: str, gpu: dict[str, Any], timestamp: float
    ) -> dict[str, Any]:
        previous = self.previous
        counters = {
            name: _counter_delta(
                None if previous is None else previous.counters.get(name, 0.0), value
            )
            for name, value in reading.counters.items()
        }
        histograms = {
            name: _histogram_delta(
                None if previous is None else previous.histograms.get(name, Histogram()), value
            )
            for name, value in reading.histograms.items()
        }
        snapshot = {
            "seq": self.seq,
            "timestamp": timestamp,
            "interval_s": None
            if self.previous_time is None
            else max(0.0, timestamp - self.previous_time),
            "mode": mode,
            "engine": reading.engine,
            "counters": counters,
            "gauges": dict(reading.gauges),
            "histograms": histograms,
            **gpu,
        }
        self.seq += 1
        self.previous, self.previous_time = reading, timestamp
        if self.first is None:
            self.first = reading
        self.last = reading
        return snapshot


class Telemetry:
    def __init__(
        self,
        control: ControlPlaneClient,
        engine: Any,
        *,
        interval: float = 5.0,
        buffer_limit: int = 120,
        gpu: GpuMonitor | None = None,
        summary_retry: RetryPolicy | None = None,
    ) -> None:
        self.control = control
        self.engine = engine
        self.interval = interval
        self.client_metrics = ClientMetrics()
        self.builder = SnapshotBuilder()
        self.gpu = gpu if gpu is not None else GpuMonitor()
        self.buffer: deque[dict[str, Any]] = deque()
        self.buffer_limit = buffer_limit
        self.dropped = 0
        self.sent = 0
        self.mode = "engine"
        self.summary_retry = summary_retry or RetryPolicy(max_attempts=1000, max_elapsed=120.0)
        self.started_at: float | None = None
        self.closed = False
        self.finished = False
        self._gpu_sums: dict[str, float] = defaultdict(float)
        self._gpu_samples = 0
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self.log_ids = {"job_id": control.job_id, "replica_id": control.replica_id}

    async def start(self) -> None:
        """Reads the engine once, picks the mode (streaming for client-side latencies), starts."""
        self.started_at = time.time()
        engine_reading = await self._read_engine()
        _, self.mode = combine(engine_reading, self.client_metrics.reading())
        self.engine.observer = self.client_metrics
        if self.mode == "client":
            self.engine.enable_streaming()
        logger.info(
            "telemetry started",
            extra={
                **self.log_ids,
                "mode": self.mode,
                "engine_metrics": engine_reading.engine if engine_reading else None,
                "gpus": len(self.gpu._handles),
                "interval_seconds": self.interval,
            },
        )
        await self._queue_snapshot(engine_reading)
        self._task = asyncio.create_task(self._loop(), name="telemetry")

    async def _loop(self) -> None:
        while not self.finished:
            await asyncio.sleep(self.interval)
            await self.tick()

    async def tick(self) -> None:
        await self._queue_snapshot(await self._read_engine())
        await self.flush()

    async def _read_engine(self) -> Reading | None:
        text = await self.engine.metrics_text()
        if text is None:
            return None
        try:
            return parse_engine_metrics(text)
        except ValueError as error:
            logger.warning(
                "engine /metrics page could not be parsed",
                extra={**self.log_ids, "error": str(error)},
            )
            return None

    async def _queue_snapshot(self, engine_reading: Reading | None) -> None:
        reading, mode = combine(engine_reading, self.client_metrics.reading())
        gpu = await asyncio.to_thread(self.gpu.read) if self.gpu.available else {}
        if gpu:
            self._gpu_samples += 1
            self._gpu_sums["gpu_sm_util_pct"] += gpu["gpu_sm_util_pct"]
            self._gpu_sums["gpu_mem_bw_util_pct"] += gpu["gpu_mem_bw_util_pct"]
        self.buffer.append(self.builder.build(reading, mode, gpu, time.time()))
        while len(self.buffer) > self.buffer_limit:
            self.buffer.popleft()
            self.dropped += 1

    async def flush(self) -> bool:
        """Sends queued snapshots in order; returns False when a send failed (they stay queued)."""
        async with self._lock:
            while self.buffer and not self.closed:
                batch = list(self.buffer)[:MAX_SNAPSHOTS_PER_REQUEST]
                try:
                    await self.control.ingest_metrics(self.builder.session, batch, self.dropped)
                except RequestRejected as error:
                    if error.status_code == 409:
                        # The control plane closed this replica's metrics (it finished or was
                        # killed); nothing sent later would count.
                        logger.warning(
                            "metrics closed by the control plane, telemetry stops",
                            extra={**self.log_ids, "error": str(error)},
                        )
                        self.closed = True
                        self.buffer.clear()
                        return False
                    logger.error(
                        "metrics rejected, dropping the batch",
                        extra={**self.log_ids, "error": str(error), "snapshots": len(batch)},
                    )
                    self.dropped += len(batch)
                    for _ in batch:
                        self.buffer.popleft()
                    continue
                except ControlPlaneError as error:
                    logger.warning(
                        "sending metrics failed, keeping them for the next send",
                        extra={**self.log_ids, "error": str(error), "queued": len(self.buffer)},
                    )
                    return False
                for _ in batch:
                    self.buffer.popleft()
                self.sent += len(batch)
                self.dropped = 0
            return True

    async def close(self, runner_stats: dict[str, Any], flush_timeout: float = 15.0) -> None:
        """Sends a last snapshot and the replica summary; safe to call twice."""
        if self.finished:
            return
        self.finished = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if not self.closed:
            try:
                await asyncio.wait_for(self.tick(), flush_timeout)
            except TimeoutError:
                logger.warning("last metrics flush timed out", extra=self.log_ids)
        summary = self.summary(runner_stats)
        try:
            await self.control.post_metrics_summary(summary, retry=self.summary_retry)
        except ControlPlaneError as error:
            logger.error(
                "metrics summary was not acknowledged", extra={**self.log_ids, "error": str(error)}
            )
        else:
            logger.info("metrics summary sent", extra=self.log_ids)
        self.gpu.close()

    def summary(self, runner_stats: dict[str, Any]) -> dict[str, Any]:
        """Returns the replica's final metrics: runtime, requests, tokens, throughput, latency."""
        ended = time.time()
        started = self.started_at or ended
        first, last = self.builder.first or Reading(), self.builder.last or Reading()
        seconds = max(ended - started, 1e-9)

        def grown(name: str) -> float | None:
            if name not in last.counters:
                return None
            return max(0.0, last.counters[name] - first.counters.get(name, 0.0))

        generation = grown("generation_tokens")
        if generation is None or self.mode == "client":
            generation = grown("live_generation_tokens")
        prompt = grown("prompt_tokens")
        if prompt is None or self.mode == "client":
            prompt = grown("live_prompt_tokens")
        summary: dict[str, Any] = {
            "replica_id": self.control.replica_id,
            "job_id": self.control.job_id,
            "engine": last.engine,
            "metrics_mode": self.mode,
            "job_start_timestamp": started,
            "job_end_timestamp": ended,
            "total_runtime_sec": round(ended - started, 3),
            **runner_stats,
            "total_input_tokens": prompt,
            "total_output_tokens": generation,
            "throughput_output_tokens_per_sec": None
            if generation is None
            else round(generation / seconds, 2),
            "throughput_tokens_per_sec": None
            if generation is None
            else round((generation + (prompt or 0.0)) / seconds, 2),
            "snapshots_sent": self.sent,
            "snapshots_dropped": self.dropped,
        }
        prefixes = {
            "time_to_first_token_seconds": "ttft_ms",
            "time_per_output_token_seconds": "tpot_ms",
            "e2e_request_latency_seconds": "e2e_ms",
        }
        for name, prefix in prefixes.items():
            histogram = last.histograms.get(name)
            base = first.histograms.get(name)
            buckets = {}
            if histogram is not None:
                buckets = {
                    le: count - (base.buckets.get(le, 0.0) if base else 0.0)
                    for le, count in histogram.buckets.items()
                }
            for label, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
                value = histogram_quantile(q, buckets)
                summary[f"{prefix}_{label}"] = None if value is None else round(value * 1000, 3)
        if self._gpu_samples:
            summary["gpu_samples"] = self._gpu_samples
            for name, total in self._gpu_sums.items():
                summary[f"avg_{name}"] = round(total / self._gpu_samples, 1)
        return summary
