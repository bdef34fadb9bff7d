"""Replica metrics: parsing real vLLM pages, ingest, job and replica snapshots, throughput.

Two replicas send what the sidecar's telemetry builds from the fixture pages: replica A runs a
vLLM with the V0 metric names, replica B a vLLM V1 with two engines (``engine="0"`` and ``"1"``).
Each replica sends a baseline snapshot and one 10 s later. The job's totals are therefore the
differences between the fixtures' "after" and "before" pages, worked out by hand in the comments.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path

import pytest

from chalicelib import aws, snapshots
from sidecar.telemetry import (
    ClientMetrics,
    SnapshotBuilder,
    combine,
    parse_engine_metrics,
)
from tests import support

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def page(name: str) -> str:
    return (FIXTURES / f"{name}.txt").read_text()


class ReplicaFeed:
    """A replica's sidecar side: builds snapshots from pages and posts them."""

    def __init__(self, client, job_id: str, replica_id: str, token: str) -> None:
        self.client = client
        self.job_id = job_id
        self.replica_id = replica_id
        self.token = token
        self.builder = SnapshotBuilder()

    def snapshot(self, text: str, timestamp: float) -> dict:
        reading, mode = combine(parse_engine_metrics(text), ClientMetrics().reading())
        return self.builder.build(reading, mode, {}, timestamp)

    def send(self, *snapshots_: dict):
        return support.post(
            self.client,
            f"/job/{self.job_id}/metrics/ingest",
            {
                "replica_id": self.replica_id,
                "session": self.builder.session,
                "snapshots": list(snapshots_),
            },
            self.token,
        )


@pytest.fixture
def two_replicas(client, aws_account):
    job = support.submit_job(client, aws_account, num_requests=4, chunk_size=2)
    tokens = support.add_replicas(client, job["job_id"], 2)
    (a_id, a_token), (b_id, b_token) = sorted(tokens.items())
    return (
        job["job_id"],
        ReplicaFeed(client, job["job_id"], a_id, a_token),
        ReplicaFeed(client, job["job_id"], b_id, b_token),
    )


def feed_both(feed_a: ReplicaFeed, feed_b: ReplicaFeed, start: float) -> None:
    for feed, generation, offset in ((feed_a, "v0", 0.0), (feed_b, "v1", 1.0)):
        before = feed.snapshot(page(f"vllm_{generation}_before"), start + offset)
        after = feed.snapshot(page(f"vllm_{generation}_after"), start + offset + 10.0)
        response = feed.send(before, after)
        assert response.status_code == 200, response.body
        assert response.json_body["ingested"] == 2


def get_metrics(client, job_id: str) -> dict:
    response = support.get(client, f"/job/{job_id}/metrics")
    assert response.status_code == 200, response.body
    return response.json_body


def test_parser_reads_both_vllm_generations():
    v0 = parse_engine_metrics(page("vllm_v0_after"))
    v1 = parse_engine_metrics(page("vllm_v1_after"))
    assert v0.engine == v1.engine == "vllm"
    # V0: gpu_cache_usage_perc; V1: kv_cache_usage_perc averaged over engines 0 and 1.
    assert v0.gauges["kv_cache_usage_perc"] == 0.42
    assert v1.gauges["kv_cache_usage_perc"] == pytest.approx(0.4)
    # Running requests add up over engines: 5 + 4.
    assert v1.gauges["num_requests_running"] == 9
    # request_success sums every finished_reason and engine: 33 + 12 + 20.
    assert v1.counters["request_success"] == 65
    # V1's inter_token_latency_seconds stands for time per output token.
    assert v1.histograms["time_per_output_token_seconds"].count == 1050
    assert v0.histograms["time_per_output_token_seconds"].count == 1100
    # A histogram of two engines sums its buckets: 40 + 25 requests.
    assert v1.histograms["time_to_first_token_seconds"].buckets["+Inf"] == 65


def test_parser_accepts_counters_without_total_suffix():
    reading = parse_engine_metrics(
        "# TYPE vllm:generation_tokens gauge\n"
        "vllm:generation_tokens 7.0\n"
        "# TYPE vllm:gpu_cache_usage_perc gauge\n"
        'vllm:gpu_cache_usage_perc{model_name="m"} 0.5\n'
    )
    assert reading.counters["generation_tokens"] == 7
    assert reading.gauges["kv_cache_usage_perc"] == 0.5


def test_parser_maps_llama_cpp_counters():
    reading = parse_engine_metrics(
        "# TYPE llamacpp:prompt_tokens_total counter\n"
        "llamacpp:prompt_tokens_total 34\n"
        "# TYPE llamacpp:tokens_predicted_total counter\n"
        "llamacpp:tokens_predicted_total 8\n"
        "# TYPE llamacpp:requests_processing gauge\n"
        "llamacpp:requests_processing 2\n"
        "# TYPE llamacpp:requests_deferred gauge\n"
        "llamacpp:requests_deferred 1\n"
    )
    assert reading.engine == "llamacpp"
    assert reading.counters == {"prompt_tokens": 34, "generation_tokens": 8}
    assert reading.gauges == {"num_requests_running": 2, "num_requests_waiting": 1}
    _, mode = combine(reading, ClientMetrics().reading())
    assert mode == "client"


def test_histogram_quantile_interpolates_inside_bucket():
    buckets = {"0.1": 0, "0.25": 20, "0.5": 80, "0.75": 100, "+Inf": 100}
    assert snapshots.histogram_quantile(0.5, buckets) == pytest.approx(0.375)
    # A rank in the +Inf bucket returns the largest finite bound.
    assert snapshots.histogram_quantile(0.99, {"1.0": 10, "+Inf": 100}) == 1.0
    assert snapshots.histogram_quantile(0.5, {"1.0": 0, "+Inf": 0}) is None
    # The first bucket's lower bound is 0.
    assert snapshots.histogram_quantile(0.5, {"0.3": 40, "+Inf": 40}) == pytest.approx(0.15)


def test_job_snapshot_sums_two_replicas(two_replicas):
    job_id, feed_a, feed_b = two_replicas
    feed_both(feed_a, feed_b, time.time() - 12)
    metrics = get_metrics(feed_a.client, job_id)
    assert set(metrics) == set(snapshots.SNAPSHOT_FIELDS)
    assert metrics["replica_id"] is None
    # Counters: A 16000-10000 and B (5000+4000)-(2000+1000) prompt tokens, and so on.
    assert metrics["prompt_tokens_total"] == 6000 + 6000
    assert metrics["generation_tokens_total"] == 4000 + 6000
    assert metrics["request_success_total"] == 40 + 60
    assert metrics["num_preemptions_total"] == 2 + 1
    # Gauges of the latest pages: running 12 + (5 + 4), waiting 3 + (1 + 0), swapped only in V0.
    assert metrics["num_requests_running"] == 21
    assert metrics["num_requests_waiting"] == 4
    assert metrics["num_requests_swapped"] == 1
    # KV cache use is averaged over replicas: (0.42 + 0.4) / 2.
    assert metrics["gpu_cache_usage_perc"] == pytest.approx(0.41)
    # Prefix cache: hits (2000 + 2000) over queries (10000 + 6000) of V1 only.
    assert metrics["prefix_cache_hit_rate"] == 0.25
    # Rates: each replica's tokens over its own 10 s, summed: 4000/10 + 6000/10.
    assert metrics["avg_generation_throughput_toks_per_s"] == 1000.0
    assert metrics["avg_prompt_throughput_toks_per_s"] == 600.0 + 600.0


def test_job_quantiles_come_from_merged_buckets(two_replicas):
    job_id, feed_a, feed_b = two_replicas
    feed_both(feed_a, feed_b, time.time() - 12)
    metrics = get_metrics(feed_a.client, job_id)
    # TTFT deltas: A 20 in (0.1, 0.25] and 20 in (0.25, 0.5]; B 40 in (0.25, 0.5] and 20 in
    # (0.5, 0.75]. Merged cumulative: 0.25 -> 20, 0.5 -> 80, 0.75 -> 100.
    # p50: rank 50 in (0.25, 0.5]: 0.25 + 0.25 * (50 - 20) / 60 = 0.375 s.
    assert metrics["ttft_ms_p50"] == pytest.approx(375.0)
    # p95: rank 95 in (0.5, 0.75]: 0.5 + 0.25 * 15 / 20; p99: 0.5 + 0.25 * 19 / 20.
    assert metrics["ttft_ms_p95"] == pytest.approx(687.5)
    assert metrics["ttft_ms_p99"] == pytest.approx(737.5)
    # TPOT: A 600 tokens in (0.01, 0.025] and 400 in (0.025, 0.05]; B (inter-token latency)
    # 1000 in (0.025, 0.05]. p50: rank 1000: 0.025 + 0.025 * 400 / 1400.
    assert metrics["tpot_ms_p50"] == pytest.approx(1000 * (0.025 + 0.025 * 400 / 1400), abs=1e-3)
    assert metrics["tpot_ms_p95"] == pytest.approx(1000 * (0.025 + 0.025 * 1300 / 1400), abs=1e-3)
    assert metrics["tpot_ms_p99"] == pytest.approx(1000 * (0.025 + 0.025 * 1380 / 1400), abs=1e-3)
    # E2E with different bounds (V0 stops at 60 s, V1 has 0.3 ... 7680 s): A 40 in (2.5, 5],
    # B 60 in (5, 10]. p50: rank 50 in (5, 10]: 5 + 5 * 10 / 60.
    assert metrics["e2e_ms_p50"] == pytest.approx(1000 * (5 + 5 * 10 / 60), abs=1e-3)
    assert metrics["e2e_ms_p95"] == pytest.approx(1000 * (5 + 5 * 55 / 60), abs=1e-3)
    assert metrics["e2e_ms_p99"] == pytest.approx(1000 * (5 + 5 * 59 / 60), abs=1e-3)
    # Queue time: A 40 in (0, 0.3] (V0 bounds start at 0.3), B 70 in (0.3, 0.5].
    # p50: rank 55 in (0.3, 0.5]: 0.3 + 0.2 * 15 / 70.
    assert metrics["queue_time_ms_p50"] == pytest.approx(1000 * (0.3 + 0.2 * 15 / 70), abs=1e-3)
    # Prefill, decode and inference times come from B only: 70 in (0.3, 0.5].
    for prefix in ("prefill_time_ms", "decode_time_ms", "inference_time_ms"):
        assert metrics[f"{prefix}_p50"] == pytest.approx(400.0)


def test_replica_snapshot_has_its_own_values(two_replicas):
    job_id, feed_a, feed_b = two_replicas
    feed_both(feed_a, feed_b, time.time() - 12)
    response = support.get(feed_a.client, f"/job/{job_id}/replicas/{feed_b.replica_id}/metrics")
    assert response.status_code == 200, response.body
    replica = response.json_body
    assert replica["replica_id"] == feed_b.replica_id
    assert replica["generation_tokens_total"] == 6000
    assert replica["avg_generation_throughput_toks_per_s"] == 600.0
    assert replica["ttft_ms_p50"] == pytest.approx(1000 * (0.25 + 0.25 * 30 / 40))
    missing = support.get(feed_a.client, f"/job/{job_id}/replicas/{job_id}-r9/metrics")
    assert missing.status_code == 404


def test_finished_replica_keeps_counters_not_rates(two_replicas):
    job_id, feed_a, feed_b = two_replicas
    client = feed_a.client
    feed_both(feed_a, feed_b, time.time() - 12)
    before = get_metrics(client, job_id)
    finished = support.post(
        client,
        f"/job/{job_id}/phase",
        {"phase": "replica_complete", "replica_id": feed_b.replica_id},
        feed_b.token,
    )
    assert finished.status_code == 200, finished.body
    after = get_metrics(client, job_id)
    for name in (
        "prompt_tokens_total",
        "generation_tokens_total",
        "request_success_total",
        "num_preemptions_total",
        "ttft_ms_p50",
        "tpot_ms_p95",
        "e2e_ms_p99",
        "prefix_cache_hit_rate",
    ):
        assert after[name] == before[name], name
    # Only A's rates and gauges remain.
    assert after["avg_generation_throughput_toks_per_s"] == 400.0
    assert after["avg_prompt_throughput_toks_per_s"] == 600.0
    assert after["num_requests_running"] == 12
    assert after["gpu_cache_usage_perc"] == 0.42
    replicas = support.get(client, f"/job/{job_id}/replicas").json_body["replicas"]
    has_metrics = {r["replica_id"]: r["has_metrics"] for r in replicas}
    assert has_metrics == {feed_a.replica_id: True, feed_b.replica_id: False}
    # The finished replica's own snapshot is still readable.
    final = support.get(client, f"/job/{job_id}/replicas/{feed_b.replica_id}/metrics")
    assert final.json_body["generation_tokens_total"] == 6000
    # A snapshot that arrives after the replica finished is not counted.
    late = feed_b.send(feed_b.snapshot(page("vllm_v1_after"), time.time()))
    assert late.status_code == 409
    assert get_metrics(client, job_id)["generation_tokens_total"] == 10000


def test_stale_replica_rates_are_excluded(two_replicas, monkeypatch):
    job_id, feed_a, feed_b = two_replicas
    feed_both(feed_a, feed_b, time.time() - 12)
    later = time.time() + snapshots.STALE_AFTER_SECONDS + 1
    monkeypatch.setattr("chalicelib.metrics_store.time.time", lambda: later)
    metrics = get_metrics(feed_a.client, job_id)
    assert metrics["avg_generation_throughput_toks_per_s"] is None
    assert metrics["num_requests_running"] is None
    assert metrics["generation_tokens_total"] == 10000


def test_throughput_window_never_mixes_replicas(two_replicas):
    job_id, feed_a, feed_b = two_replicas
    now = time.time()
    # A has rows at now-20 and now-10 (0, then 4000 generated tokens), B at now-15 and now-5 (0,
    # then 6000). A difference across replicas, such as B's last total minus A's first over 15 s,
    # would give 400 tok/s. Per replica it is 4000/10 + 6000/10.
    for feed, generation, start in ((feed_a, "v0", now - 20), (feed_b, "v1", now - 15)):
        before = feed.snapshot(page(f"vllm_{generation}_before"), start)
        after = feed.snapshot(page(f"vllm_{generation}_after"), start + 10)
        assert feed.send(before, after).status_code == 200
    response = support.get(feed_a.client, f"/job/{job_id}/throughput?window=60")
    assert response.status_code == 200, response.body
    body = response.json_body
    assert body["generation_toks_per_s"] == 1000.0
    assert body["prompt_toks_per_s"] == 1200.0
    per_replica = {r["replica_id"]: r["generation_toks_per_s"] for r in body["replicas"]}
    assert per_replica == {feed_a.replica_id: 400.0, feed_b.replica_id: 600.0}
    assert body["window_actual_sec"] == 10.0


def test_throughput_needs_two_samples(two_replicas):
    job_id, feed_a, _ = two_replicas
    feed_a.send(feed_a.snapshot(page("vllm_v0_before"), time.time()))
    response = support.get(feed_a.client, f"/job/{job_id}/throughput?window=60")
    assert response.status_code == 404


def test_resent_batch_counts_once(two_replicas):
    job_id, feed_a, _ = two_replicas
    batch = [
        feed_a.snapshot(page("vllm_v0_before"), time.time() - 10),
        feed_a.snapshot(page("vllm_v0_after"), time.time()),
    ]
    assert feed_a.send(*batch).json_body["ingested"] == 2
    again = feed_a.send(*batch).json_body
    assert again["ingested"] == 0
    assert again["duplicates"] == 2
    assert get_metrics(feed_a.client, job_id)["generation_tokens_total"] == 4000


def test_ingest_moves_replica_to_running(two_replicas):
    job_id, feed_a, _ = two_replicas
    client = feed_a.client
    feed_a.send(feed_a.snapshot(page("vllm_v0_before"), time.time()))
    replicas = {
        r["replica_id"]: r
        for r in support.get(client, f"/job/{job_id}/replicas").json_body["replicas"]
    }
    assert replicas[feed_a.replica_id]["phase"] == "running"
    assert replicas[feed_a.replica_id]["last_heartbeat"] is not None
    events = support.get(client, f"/job/{job_id}/events").json_body["events"]
    moved = [e for e in events if e["kind"] == "replica_phase" and e.get("phase") == "running"]
    assert len(moved) == 1
    assert moved[0]["previous_phase"] == "registered"


def test_ingest_rejects_other_replicas_token(two_replicas):
    job_id, feed_a, feed_b = two_replicas
    snapshot = feed_a.snapshot(page("vllm_v0_before"), time.time())
    response = support.post(
        feed_a.client,
        f"/job/{job_id}/metrics/ingest",
        {"replica_id": feed_b.replica_id, "session": "s1", "snapshots": [snapshot]},
        feed_a.token,
    )
    assert response.status_code == 403


def test_ingest_rejects_non_finite_values(two_replicas):
    job_id, feed_a, _ = two_replicas
    body = (
        f'{{"replica_id": "{feed_a.replica_id}", "session": "s1", "snapshots": [{{"seq": 0, '
        '"timestamp": 1.0, "counters": {"generation_tokens": Infinity}}]}'
    )
    response = feed_a.client.http.post(
        f"/job/{job_id}/metrics/ingest",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {feed_a.token}"},
        body=body.encode(),
    )
    assert response.status_code == 400


def test_metrics_not_found_before_ingest(client, aws_account):
    job = support.submit_job(client, aws_account, num_requests=2, chunk_size=1)
    response = support.get(client, f"/job/{job['job_id']}/metrics")
    assert response.status_code == 404
    assert "no metrics" in response.json_body["message"]


def test_summaries_are_stored_and_listed(two_replicas):
    job_id, feed_a, feed_b = two_replicas
    client = feed_a.client
    for feed, value in ((feed_b, 2.0), (feed_a, 1.0), (feed_b, 3.0)):
        response = support.post(
            client,
            f"/job/{job_id}/metrics/summary",
            {"replica_id": feed.replica_id, "metrics": {"ttft_ms_p50": value}},
            feed.token,
        )
        assert response.status_code == 200, response.body
    body = support.get(client, f"/job/{job_id}/replicas/summaries").json_body
    assert body["count"] == 2
    # Ordered by first arrival; a second post replaces the metrics.
    assert [s["replica_id"] for s in body["summaries"]] == [feed_b.replica_id, feed_a.replica_id]
    assert body["summaries"][0]["ttft_ms_p50"] == 3.0


def test_summary_keeps_empty_and_type_keys(two_replicas):
    job_id, feed_a, _ = two_replicas
    client = feed_a.client
    metrics = {"": True, "BOOL": True, "S": {"N": 1, "M": [None, "x"]}}
    response = support.post(
        client,
        f"/job/{job_id}/metrics/summary",
        {"replica_id": feed_a.replica_id, "metrics": metrics},
        feed_a.token,
    )
    assert response.status_code == 200, response.body
    listed = support.get(client, f"/job/{job_id}/replicas/summaries")
    assert listed.status_code == 200, listed.body
    assert listed.json_body["summaries"] == [{**metrics, "replica_id": feed_a.replica_id}]


class DynamoRequests:
    """Counts DynamoDB requests by operation, and the items each Query returned."""

    WRITES = frozenset(
        {"PutItem", "UpdateItem", "DeleteItem", "TransactWriteItems", "BatchWriteItem"}
    )

    def __init__(self, dynamodb) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.items_read = 0
        dynamodb.meta.events.register("before-call.dynamodb", self._before)
        dynamodb.meta.events.register("after-call.dynamodb", self._after)

    def _before(self, model, **kwargs) -> None:
        self.calls[model.name] += 1

    def _after(self, http_response, parsed, model, **kwargs) -> None:
        if model.name == "Query":
            self.items_read += int(parsed.get("Count", 0))
        elif model.name == "GetItem" and parsed.get("Item"):
            self.items_read += 1

    def reset(self) -> None:
        self.calls.clear()
        self.items_read = 0

    def writes(self) -> int:
        return sum(n for name, n in self.calls.items() if name in self.WRITES)

    def total(self) -> int:
        return sum(self.calls.values())


def _ingest_costs(client, settings, replica_count: int) -> tuple[int, int, int, int]:
    """Returns (writes, requests) of one steady-state ingest, and (requests, items) of a read."""
    job = support.submit_job(client, settings, num_requests=16, chunk_size=1)
    job_id = job["job_id"]
    tokens = support.add_replicas(client, job_id, replica_count)
    feeds = [ReplicaFeed(client, job_id, rid, token) for rid, token in sorted(tokens.items())]
    start = time.time() - 10
    for feed in feeds:
        # The first ingest moves the replica to running and caches its verified token.
        assert feed.send(feed.snapshot(page("vllm_v1_before"), start)).status_code == 200
    counter = DynamoRequests(aws.client("dynamodb"))
    feed = feeds[-1]
    response = feed.send(feed.snapshot(page("vllm_v1_after"), start + 5))
    assert response.status_code == 200, response.body
    writes, requests = counter.writes(), counter.total()
    counter.reset()
    get_metrics(client, job_id)
    return writes, requests, counter.calls["Query"] + counter.calls["GetItem"], counter.items_read


def test_ingest_cost_does_not_grow_with_replicas(client, aws_account):
    one = _ingest_costs(client, aws_account, 1)
    eight = _ingest_costs(client, aws_account, 8)
    writes_one, requests_one, _, _ = one
    writes_eight, requests_eight, read_requests, items_read = eight
    assert writes_one == writes_eight
    assert requests_one == requests_eight
    # One GetItem of the replica's own state, one transaction, one heartbeat update.
    assert requests_one == 3
    # The job snapshot is one Query returning one state item per active replica.
    assert read_requests == 1
    assert items_read == 8


def test_job_read_adds_one_item_for_finished_replicas(two_replicas):
    job_id, feed_a, feed_b = two_replicas
    client = feed_a.client
    feed_both(feed_a, feed_b, time.time() - 12)
    support.post(
        client,
        f"/job/{job_id}/phase",
        {"phase": "replica_complete", "replica_id": feed_b.replica_id},
        feed_b.token,
    )
    counter = DynamoRequests(aws.client("dynamodb"))
    get_metrics(client, job_id)
    # A's state item plus the retired totals of B.
    assert counter.items_read == 2
    assert counter.total() == 1
