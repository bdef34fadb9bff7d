"""Placement solver: memory fit worked by hand, ranking, quotas, prices, routes and the CLI."""

from __future__ import annotations

import datetime
import json

import httpx
import pytest
from botocore.stub import ANY, Stubber
from typer.testing import CliRunner

from chalicelib import catalog, placement, prices, quotas, roofline
from chalicelib.catalog import GIB
from chalicelib.errors import InvalidRequest
from chalicelib.roofline import MemoryFit, Rejection, Workload
from tests import support

INSTANCES = catalog.instance_by_name()
LLAMA_70B = catalog.find_model("meta-llama/Llama-3.1-70B-Instruct")
LLAMA_8B = catalog.find_model("meta-llama/Llama-3.1-8B-Instruct")
PLENTY = {"*": {"G": {"on_demand": 1536, "spot": 1536}, "P": {"on_demand": 1536, "spot": 1536}}}
TWO_REGIONS = ("us-east-1", "us-west-2")


def fit_of(arch, instance_type: str, tp: int, pp: int = 1, max_model_len: int = 4096):
    return roofline.memory_fit(arch, INSTANCES[instance_type], tp, pp, max_model_len)


def solve(arch, workload, deadline_hours, *, quota=PLENTY, spot=None, regions=TWO_REGIONS, **kw):
    options = placement.Options(regions=regions, **kw)
    return placement.solve(
        arch,
        workload,
        deadline_hours,
        options,
        quotas.StaticQuotaSource(quota),
        prices.StaticPriceSource(spot=spot),
    )


# Memory fit, worked by hand. GiB = 2**30 bytes; weights are 2 bytes per parameter.


def test_70b_does_not_fit_one_a10g():
    # 70.6e9 parameters x 2 bytes = 131.5 GiB, against 22.35 GiB x 0.9 = 20.1 GiB usable.
    result = fit_of(LLAMA_70B, "g5.xlarge", tp=1)
    assert isinstance(result, Rejection)
    assert result.code == "memory_weights"
    assert "131.5 GiB" in result.message
    assert "20.1 GiB" in result.message


def test_70b_fits_four_l40s_tp4():
    result = fit_of(LLAMA_70B, "g6e.12xlarge", tp=4)
    assert isinstance(result, MemoryFit)
    weights = 70.6e9 * 2 / 4  # 35.3e9 bytes = 32.88 GiB per GPU
    # Profile step: 8192 tokens x (8 x 8192 + 4 x 28672 / 4) bytes, plus FP32 logits of 256
    # sequences over 128256 / 4 vocabulary entries.
    activations = 8192 * (8 * 8192 + 4 * 28672 / 4) + 256 * 128256 / 4 * 4
    runtime = 1.5 * GIB  # 1.0 GiB runtime + 0.5 GiB NCCL buffers (tp > 1)
    kv_cache = 44.7 * GIB * 0.9 - weights - activations - runtime  # 5.10 GiB
    per_token = 2 * 80 * (8 // 4) * 128 * 2  # K and V, 80 layers, 2 KV heads per GPU: 80 KiB
    assert result.weights_gib == pytest.approx(weights / GIB)
    assert result.weights_gib == pytest.approx(32.88, abs=0.01)
    assert result.kv_cache_gib == pytest.approx(kv_cache / GIB)
    assert result.kv_cache_gib == pytest.approx(5.10, abs=0.01)
    assert result.kv_bytes_per_token == per_token == 81920
    assert result.kv_capacity_tokens == int(kv_cache // per_token)
    assert result.kv_capacity_tokens > 60_000


def test_70b_fits_eight_a100_80gb_tp8():
    result = fit_of(LLAMA_70B, "p4de.24xlarge", tp=8)
    assert isinstance(result, MemoryFit)
    assert result.weights_gib == pytest.approx(70.6e9 * 2 / 8 / GIB)  # 16.44 GiB
    # 8 KV heads over 8 GPUs: one head per GPU, 2 x 80 x 1 x 128 x 2 bytes = 40 KiB per token.
    assert result.kv_bytes_per_token == 40960
    assert result.kv_cache_gib > 50


def test_70b_four_a100_40gb_short_context():
    # p4d (A100 40 GB) at tp 4: 36.0 GiB usable - 32.88 GiB weights - 0.75 GiB activations -
    # 1.5 GiB runtime = 0.87 GiB of KV cache, 11468 tokens of 80 KiB.
    short = fit_of(LLAMA_70B, "p4d.24xlarge", tp=4, max_model_len=4096)
    assert isinstance(short, MemoryFit)
    assert short.kv_capacity_tokens == 11468
    long = fit_of(LLAMA_70B, "p4d.24xlarge", tp=4, max_model_len=16384)
    assert isinstance(long, Rejection)
    assert long.code == "memory_kv_cache"


def test_8b_fits_one_l4():
    result = fit_of(LLAMA_8B, "g6.xlarge", tp=1)
    assert isinstance(result, MemoryFit)
    weights = 8.03e9 * 2  # 14.96 GiB
    activations = 8192 * (8 * 4096 + 4 * 14336) + 256 * 128256 * 4  # 0.81 GiB
    kv_cache = 22.35 * GIB * 0.9 - weights - activations - 1.0 * GIB  # 3.35 GiB
    per_token = 2 * 32 * 8 * 128 * 2  # 128 KiB
    assert result.kv_capacity_tokens == int(kv_cache // per_token)
    assert 27_000 < result.kv_capacity_tokens < 28_000


def test_8b_on_one_l4_rejects_32k_context():
    result = fit_of(LLAMA_8B, "g6.xlarge", tp=1, max_model_len=32768)
    assert isinstance(result, Rejection)
    assert result.code == "memory_kv_cache"
    assert "32768-token sequence" in result.message


def test_tp_must_divide_attention_heads():
    qwen = catalog.find_model("Qwen/Qwen2.5-7B-Instruct")  # 28 heads, 4 KV heads
    problem = roofline.parallelism_problem(qwen, INSTANCES["g6e.48xlarge"], 8, 1)
    assert problem is not None
    assert problem.code == "tp_heads"
    assert "28 attention heads" in problem.message


def test_mixture_of_experts_expert_parameters():
    mixtral = catalog.find_model("mistralai/Mixtral-8x7B-Instruct-v0.1")
    # active = shared + experts x 2/8 and total = shared + experts, so
    # experts = (46.7e9 - 12.9e9) / (1 - 2/8) = 45.07e9.
    assert mixtral.expert_parameters() == pytest.approx((46.7e9 - 12.9e9) / 0.75)
    assert mixtral.is_moe


def test_decode_reads_weights_once_per_step():
    # One sequence, no prompt: the step reads 16.06e9 bytes at 300 GB/s x 0.75 (71.4 ms) plus
    # its KV cache, and adds 1.5 ms of step overhead.
    seconds, bound = roofline.step_seconds(LLAMA_8B, INSTANCES["g6.xlarge"], 1, 1, 1, 0, 0, 0)
    assert bound == "memory"
    assert seconds == pytest.approx(8.03e9 * 2 / (300e9 * 0.75) + 1.5e-3)


def test_pcie_allreduce_costs_more_than_nvlink():
    workload = Workload(10_000, 1000, 2000, 200, 1000)
    pcie = roofline.replica_throughput(
        LLAMA_70B, INSTANCES["g6e.48xlarge"], 8, 1, workload, 100_000, 10_000
    )
    a100 = roofline.replica_throughput(
        LLAMA_70B, INSTANCES["p4de.24xlarge"], 8, 1, workload, 100_000, 10_000
    )
    assert pcie.tokens_per_second < a100.tokens_per_second


# Catalog lookups.


def test_model_lookup_is_case_insensitive():
    assert catalog.find_model("META-LLAMA/llama-3.1-8b-instruct") is LLAMA_8B
    assert catalog.find_model("Llama-3.1-8B-Instruct") is LLAMA_8B
    assert catalog.find_model("huggingfacetb/smollm2-135m-instruct").hidden_size == 576


def test_unknown_model_names_model_and_architecture_field():
    with pytest.raises(InvalidRequest) as raised:
        catalog.resolve_model("org/Tiny-1B", None)
    assert "'org/Tiny-1B'" in raised.value.message
    assert "model_architecture" in raised.value.message
    assert raised.value.details["field"] == "model_name"


def test_catalog_has_required_families_and_distinct_a100s():
    names = set(INSTANCES)
    for family in ("g5.", "g6.", "g6e.", "p4d.", "p4de.", "p5.", "p5e.", "p5en.", "p6-b200."):
        assert any(name.startswith(family) for name in names), family
    assert INSTANCES["p4d.24xlarge"].gpu.memory_gib == 40
    assert INSTANCES["p4de.24xlarge"].gpu.memory_gib == 80
    assert {i.gpu_count for i in INSTANCES.values()} >= {1, 4, 8}
    sources, _ = catalog.instance_catalog()
    for instance in INSTANCES.values():
        assert instance.price_source in sources
        assert instance.quota_family == ("P" if instance.instance_type.startswith("p") else "G")


def test_gpu_type_matching():
    assert catalog.match_gpu_type("a100") == {"A100-40GB", "A100-80GB"}
    assert catalog.match_gpu_type("A100_80GB") == {"A100-80GB"}
    assert catalog.match_gpu_type("h200") == {"H200"}
    assert catalog.match_gpu_type("B200") == {"B200"}
    with pytest.raises(InvalidRequest) as raised:
        catalog.match_gpu_type("TPU")
    assert raised.value.details["field"] == "gpu_type"


# Solver: ranking, deadlines, quotas and prices.


def test_larger_deadline_never_costs_more():
    workload = Workload(20_000, 800, 2000, 400, 1024)
    for arch in (LLAMA_8B, LLAMA_70B):
        costs = []
        for deadline in (1.5, 2, 3, 4, 8, 24, 72):
            top = solve(arch, workload, deadline).placements[0]
            assert top["meets_slo"], (arch.name, deadline)
            costs.append(top["total_cost"])
        assert costs == sorted(costs, reverse=True), (arch.name, costs)


def test_short_deadline_adds_replicas():
    workload = Workload(200_000, 800, 2000, 400, 1024)
    slow = solve(LLAMA_8B, workload, 48, gpu_types=frozenset({"L4"})).placements[0]
    fast = solve(LLAMA_8B, workload, 2, gpu_types=frozenset({"L4"})).placements[0]
    assert fast["replicas"] > slow["replicas"]
    assert fast["meets_slo"]
    assert fast["estimated_runtime_hours"] <= 2


def test_zero_quota_gives_only_reasons():
    solution = solve(LLAMA_8B, Workload(1000, 500, 1000, 200, 512), 4, quota={})
    assert solution.placements == []
    quota_drops = [d for d in solution.dropped if d["code"] == "quota"]
    assert quota_drops
    assert all(d["free_vcpus"] == 0 for d in quota_drops)
    assert "quota" in quota_drops[0]["reason"]
    assert "quota" in solution.infeasibility()


def test_impossible_deadline_names_startup():
    solution = solve(LLAMA_8B, Workload(1000, 500, 1000, 200, 512), 0.05)
    assert solution.placements == []
    reason = solution.infeasibility()
    assert "take longer than the deadline" in reason
    assert "none can finish in under about 0.17 h" in reason
    # The memory and sharding reasons of the largest shapes are not what stopped this job.
    assert "tp8 pp4" not in reason


def test_spot_without_price_is_dropped_not_guessed():
    solution = solve(LLAMA_8B, Workload(1000, 500, 1000, 200, 512), 4)
    assert {p["market"] for p in solution.placements} == {"on_demand"}
    spot_drops = [d for d in solution.dropped if d["code"] == "no_spot_price"]
    assert spot_drops
    assert spot_drops[0]["regions"] == list(TWO_REGIONS)


def test_spot_ranks_before_on_demand_at_equal_cost():
    spot = {"*": {"g6.xlarge": 0.8048}}  # the catalog's on-demand price
    solution = solve(
        LLAMA_8B,
        Workload(1000, 500, 1000, 200, 512),
        4,
        spot=spot,
        gpu_types=frozenset({"L4"}),
        regions=("us-east-1",),
    )
    first, second = solution.placements[:2]
    assert (first["instance_type"], second["instance_type"]) == ("g6.xlarge", "g6.xlarge")
    assert first["total_cost"] == second["total_cost"]
    assert (first["market"], second["market"]) == ("spot", "on_demand")
    assert first["price_source"] == "static"
    assert first["is_fallback"] is False
    assert second["is_fallback"] is True


def test_cheaper_spot_wins():
    spot = {"us-west-2": {"g6.xlarge": 0.40}}
    top = solve(LLAMA_8B, Workload(1000, 500, 1000, 200, 512), 4, spot=spot).placements[0]
    assert (top["instance_type"], top["market"], top["region"]) == (
        "g6.xlarge",
        "spot",
        "us-west-2",
    )


def test_regions_ordered_by_free_quota_not_limit():
    quota = {
        "us-east-1": {"G": {"on_demand": {"limit": 512, "used": 500}}},
        "us-west-2": {"G": {"on_demand": 64}},
    }
    top = solve(
        LLAMA_8B,
        Workload(1000, 500, 1000, 200, 512),
        4,
        quota=quota,
        gpu_types=frozenset({"L4"}),
    ).placements
    first_two = [(p["instance_type"], p["region"]) for p in top[:2]]
    assert first_two == [("g6.xlarge", "us-west-2"), ("g6.xlarge", "us-east-1")]
    assert top[0]["free_vcpus"] == 64
    assert top[1]["free_vcpus"] == 12


def test_quota_caps_replicas_and_misses_deadline():
    workload = Workload(500_000, 800, 2000, 400, 1024)
    quota = {"*": {"G": {"on_demand": 8}}}  # two g6.xlarge at most
    solution = solve(LLAMA_8B, workload, 2, quota=quota, gpu_types=frozenset({"L4"}))
    top = solution.placements[0]
    assert top["meets_slo"] is False
    assert top["limited_by"] == "quota"
    assert top["replicas"] * top["vcpus_per_replica"] <= 8


def test_placements_meeting_deadline_rank_first():
    workload = Workload(300_000, 800, 2000, 400, 1024)
    quota = {"us-east-1": {"G": {"on_demand": 8}}, "us-west-2": PLENTY["*"]}
    solution = solve(LLAMA_8B, workload, 2, quota=quota)
    flags = [p["meets_slo"] for p in solution.placements]
    assert flags[0] is True
    assert flags == sorted(flags, reverse=True)


def test_placement_has_every_documented_field():
    top = solve(LLAMA_8B, Workload(1000, 500, 1000, 200, 512), 4).placements[0]
    for key in (
        "instance_type",
        "gpu_type",
        "tp_size",
        "pp_size",
        "num_instances",
        "replicas",
        "market",
        "region",
        "max_model_len",
        "throughput_tokens_per_sec",
        "cost_per_hour",
        "cost_per_million_tokens",
        "estimated_runtime_hours",
        "meets_slo",
        "is_fallback",
    ):
        assert key in top, key
    # 1000 + 512 = 1512 tokens, rounded up to a multiple of 256.
    assert top["max_model_len"] == 1536


def test_405b_needs_pipeline_or_big_gpus():
    llama_405b = catalog.find_model("meta-llama/Llama-3.1-405B-Instruct")
    solution = solve(llama_405b, Workload(5000, 500, 1000, 200, 512), 24)
    assert solution.placements
    for placement_entry in solution.placements:
        gpus = placement_entry["tp_size"] * placement_entry["pp_size"]
        memory = INSTANCES[placement_entry["instance_type"]].gpu.memory_gib * gpus
        assert memory * 0.9 > 405.9e9 * 2 / GIB


# Quota and price sources.


def test_static_quotas_default_region_and_used():
    source = quotas.StaticQuotaSource(
        {"*": {"P": {"spot": 96}}, "eu-west-1": {"G": {"on_demand": {"limit": 64, "used": 16}}}}
    )
    pools = {(p.region, p.family, p.market): p for p in source.pools(["us-east-1", "eu-west-1"])}
    assert pools[("us-east-1", "P", "spot")].available_vcpus == 96
    assert pools[("us-east-1", "G", "spot")].available_vcpus == 0
    assert pools[("eu-west-1", "G", "on_demand")].available_vcpus == 48
    assert pools[("eu-west-1", "P", "spot")].available_vcpus == 0


@pytest.mark.parametrize(
    "data, expected",
    [
        ([], "JSON object"),
        ({"us-east-1": {"X": {}}}, "'X' is not G or P"),
        ({"us-east-1": {"G": {"reserved": 1}}}, "'reserved' is not spot or on_demand"),
        ({"us-east-1": {"G": {"spot": -4}}}, "at least 0"),
    ],
)
def test_static_quotas_reject_bad_data(data, expected):
    with pytest.raises(quotas.SourceConfigError) as raised:
        quotas.StaticQuotaSource(data)
    assert expected in raised.value.message


def test_static_source_needs_quota_values(monkeypatch):
    monkeypatch.setenv("TANDEMN_QUOTA_SOURCE", "static")
    monkeypatch.delenv("TANDEMN_QUOTAS", raising=False)
    monkeypatch.delenv("TANDEMN_QUOTAS_FILE", raising=False)
    with pytest.raises(quotas.SourceConfigError) as raised:
        quotas.source_from_env()
    assert "TANDEMN_QUOTAS" in raised.value.message


class _Clients:
    """Stubbed boto3 clients per (service, region); no request leaves the process."""

    def __init__(self) -> None:
        import boto3

        self._session = boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing"
        )
        self.clients: dict[tuple[str, str], object] = {}
        self.stubbers: dict[tuple[str, str], Stubber] = {}

    def stub(self, service: str, region: str) -> Stubber:
        key = (service, region)
        if key not in self.stubbers:
            client = self._session.client(service, region_name=region)
            self.clients[key] = client
            self.stubbers[key] = Stubber(client)
        return self.stubbers[key]

    def __call__(self, service: str, region: str):
        return self.clients[(service, region)]


def test_aws_quotas_subtract_own_instances():
    clients = _Clients()
    ec2 = clients.stub("ec2", "us-east-1")
    ec2.add_response(
        "describe_instances",
        {
            "Reservations": [
                {
                    "Instances": [
                        {
                            "InstanceType": "g6e.12xlarge",
                            "CpuOptions": {"CoreCount": 24, "ThreadsPerCore": 2},
                        },
                        {
                            "InstanceType": "p5.48xlarge",
                            "InstanceLifecycle": "spot",
                            "CpuOptions": {"CoreCount": 96, "ThreadsPerCore": 2},
                        },
                    ]
                }
            ]
        },
        {
            "Filters": [
                {"Name": "instance-state-name", "Values": ["pending", "running"]},
                {"Name": "tag-key", "Values": [quotas.PROJECT_TAG_KEY]},
            ]
        },
    )

    service_quotas = clients.stub("service-quotas", "us-east-1")
    values = {("G", "spot"): 64, ("P", "on_demand"): 0}
    for family in quotas.FAMILIES:
        for market in quotas.MARKETS:
            code = quotas.QUOTA_CODES[(family, market)]
            request = {"ServiceCode": "ec2", "QuotaCode": code}
            if (family, market) == ("P", "spot"):
                service_quotas.add_client_error(
                    "get_service_quota", "NoSuchResourceException", expected_params=request
                )
                service_quotas.add_response(
                    "get_aws_default_service_quota", {"Quota": {"Value": 384.0}}, request
                )
            else:
                value = values.get((family, market), 192)
                service_quotas.add_response(
                    "get_service_quota", {"Quota": {"Value": float(value)}}, request
                )

    with ec2, service_quotas:
        pools = quotas.AwsQuotaSource(clients).pools(["us-east-1"])

    by_key = {(p.family, p.market): p for p in pools}
    assert by_key[("G", "on_demand")].limit_vcpus == 192
    assert by_key[("G", "on_demand")].used_vcpus == 48
    assert by_key[("G", "on_demand")].available_vcpus == 144
    assert by_key[("G", "spot")].available_vcpus == 64
    assert by_key[("P", "spot")].limit_vcpus == 384
    assert by_key[("P", "spot")].used_vcpus == 192
    assert by_key[("P", "on_demand")].available_vcpus == 0


def test_aws_quota_source_marks_unreadable_region():
    clients = _Clients()
    ec2 = clients.stub("ec2", "eu-west-1")
    ec2.add_client_error("describe_instances", "UnauthorizedOperation")
    clients.stub("service-quotas", "eu-west-1")
    with ec2:
        pools = quotas.AwsQuotaSource(clients).pools(["eu-west-1"])
    assert len(pools) == 4
    assert all(p.available_vcpus == 0 for p in pools)
    assert "UnauthorizedOperation" in pools[0].error


def test_aws_prices_cheapest_spot_zone():
    clients = _Clients()
    ec2 = clients.stub("ec2", "us-west-2")
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    ec2.add_response(
        "describe_spot_price_history",
        {
            "SpotPriceHistory": [
                {
                    "InstanceType": "g6.xlarge",
                    "AvailabilityZone": "us-west-2a",
                    "SpotPrice": "0.4100",
                    "Timestamp": now,
                    "ProductDescription": "Linux/UNIX",
                },
                {
                    "InstanceType": "g6.xlarge",
                    "AvailabilityZone": "us-west-2b",
                    "SpotPrice": "0.3300",
                    "Timestamp": now,
                    "ProductDescription": "Linux/UNIX",
                },
            ]
        },
        {
            "InstanceTypes": ["g6.xlarge", "g6e.xlarge"],
            "ProductDescriptions": ["Linux/UNIX"],
            "StartTime": ANY,
        },
    )
    product = {
        "product": {"attributes": {"instanceType": "g6e.xlarge"}},
        "terms": {
            "OnDemand": {
                "t": {
                    "priceDimensions": {
                        "d": {"unit": "Hrs", "pricePerUnit": {"USD": "1.8610000000"}}
                    }
                }
            }
        },
    }
    pricing = clients.stub("pricing", "us-east-1")
    pricing.add_response("get_products", {"PriceList": [json.dumps(product)]}, None)
    ec2.add_response(
        "describe_instance_type_offerings",
        {
            "InstanceTypeOfferings": [
                {"InstanceType": "g6.xlarge", "LocationType": "region", "Location": "us-west-2"}
            ]
        },
        None,
    )

    with ec2, pricing:
        book = prices.AwsPriceSource(clients).price_book(["us-west-2"], ["g6.xlarge", "g6e.xlarge"])
    spot = book.price("us-west-2", "g6.xlarge", "spot")
    assert (spot.usd_per_hour, spot.zone, spot.source) == (0.33, "us-west-2b", "spot_price_history")
    assert book.price("us-west-2", "g6e.xlarge", "spot") is None
    listed = book.price("us-west-2", "g6e.xlarge", "on_demand")
    assert (listed.usd_per_hour, listed.source) == (1.861, "price_list_api")
    fallback = book.price("us-west-2", "g6.xlarge", "on_demand")
    assert (fallback.usd_per_hour, fallback.source) == (0.8048, "catalog_us_east_1")
    assert book.is_offered("us-west-2", "g6.xlarge")
    assert not book.is_offered("us-west-2", "g6e.xlarge")
    assert book.errors == []


# Routes.


def direct_body(**extra):
    body = {
        "model_name": "meta-llama/Llama-3.1-8B-Instruct",
        "num_lines": 5000,
        "avg_input_tokens": 600,
        "max_input_tokens": 2000,
        "avg_output_tokens": 300,
        "slo_deadline_hours": 4,
    }
    body.update(extra)
    return body


def test_test_placement_route_with_direct_stats(client):
    response = support.post(client, "/test/placement", direct_body())
    assert response.status_code == 200, response.body
    body = response.json_body
    assert body["status"] == "ok"
    assert body["solver"] == "roofline"
    assert body["feasible"] is True
    assert body["input_stats"]["num_lines"] == 5000
    assert body["input_stats"]["avg_output_tokens_source"] == "request"
    assert body["quota_source"] == "static"
    assert len(body["regions"]) == 8
    top = body["placements"][0]
    assert top["rank"] == 1
    assert top["meets_slo"] is True
    assert isinstance(body["dropped"], list)


def test_test_placement_route_reads_input_file(client, aws_account):
    records = [support.request_line(f"r{i}", content="x" * 400, max_tokens=64) for i in range(30)]
    uri = support.upload(aws_account.bucket, "inputs/plan.jsonl", support.jsonl(records))
    response = support.post(
        client,
        "/test/placement",
        {"model_name": "HuggingFaceTB/SmolLM2-135M-Instruct", "input_file": uri},
    )
    assert response.status_code == 200, response.body
    stats = response.json_body["input_stats"]
    assert stats["num_lines"] == 30
    assert stats["avg_output_tokens_source"] == "max_tokens_in_file"
    assert stats["max_output_tokens"] == 64
    # 400 characters are an estimated 100 prompt tokens, planned as 100 x 1.5 + 64 = 214.
    assert stats["max_input_tokens"] == 100
    assert stats["max_input_tokens_planned"] == 214
    assert stats["max_model_len"] == 512
    assert response.json_body["placements"]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"num_lines": None}, "num_lines"),
        ({"avg_output_tokens": None}, "avg_output_tokens"),
        ({"tp_size": 3}, "tp_size"),
        ({"slo_deadline_hours": 0}, "slo_deadline_hours"),
        ({"gpu_type": "TPU-v5"}, "gpu_type"),
        ({"max_input_tokens": 10}, "max_input_tokens"),
        ({"input_file": "s3://tandemn-test/x.jsonl"}, "num_lines"),
        ({"placement_solver": "user_specified"}, "gpu_type"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_test_placement_route_names_bad_field(client, change, field):
    body = {k: v for k, v in direct_body(**change).items() if v is not None}
    response = support.post(client, "/test/placement", body)
    assert response.status_code == 400, response.body
    assert field in response.json_body["message"]
    details = response.json_body.get("errors") or [response.json_body]
    assert details[0]["field"] == field


def test_test_placement_unknown_model_explains_architecture(client):
    response = support.post(client, "/test/placement", direct_body(model_name="org/Tiny-1B"))
    assert response.status_code == 400
    message = response.json_body["message"]
    assert "'org/Tiny-1B'" in message
    assert "model_architecture" in message
    assert response.json_body["field"] == "model_name"


def test_test_placement_accepts_model_architecture(client):
    architecture = {
        "num_hidden_layers": 22,
        "hidden_size": 2048,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
        "num_parameters": 1.1e9,
    }
    response = support.post(
        client,
        "/test/placement",
        direct_body(
            model_name="org/Tiny-1B",
            model_architecture=architecture,
            max_input_tokens=1000,
            avg_input_tokens=500,
        ),
    )
    assert response.status_code == 200, response.body
    assert response.json_body["model"]["origin"] == "request"
    assert response.json_body["model"]["head_dim"] == 64


def test_test_placement_zero_quota_lists_reasons(client, monkeypatch):
    monkeypatch.setenv("TANDEMN_QUOTAS", "{}")
    response = support.post(client, "/test/placement", direct_body())
    assert response.status_code == 200
    body = response.json_body
    assert body["feasible"] is False
    assert body["placements"] == []
    assert "quota" in body["reason"]
    assert any(d["code"] == "quota" for d in body["dropped"])


def test_resources_lists_catalog_and_quota_pools(client):
    response = support.get(client, "/resources")
    assert response.status_code == 200
    body = response.json_body
    by_type = {i["instance_type"]: i for i in body["instances"]}
    assert by_type["p4d.24xlarge"]["gpu_memory_gib"] == 40
    assert by_type["p4de.24xlarge"]["gpu_memory_gib"] == 80
    assert by_type["p6-b200.48xlarge"]["gpu_type"] == "B200"
    assert by_type["g6.xlarge"]["price_source"].startswith("skypilot-org/skypilot-catalog")
    assert "H200" in body["gpu_types"]
    assert "meta-llama/Llama-3.1-70B-Instruct" in body["models"]
    assert len(body["quota"]["pools"]) == 8 * 2 * 2


def test_quota_status_orders_regions_by_free_vcpus(client, monkeypatch):
    monkeypatch.setenv(
        "TANDEMN_QUOTAS",
        json.dumps(
            {
                "*": {"G": {"on_demand": 8}},
                "eu-west-1": {"G": {"on_demand": 96, "spot": {"limit": 400, "used": 380}}},
                "us-west-2": {"P": {"on_demand": {"limit": 2000, "used": 1990}}},
            }
        ),
    )
    response = support.get(client, "/quota/status")
    assert response.status_code == 200
    body = response.json_body
    assert [r["region"] for r in body["regions"][:2]] == ["eu-west-1", "us-west-2"]
    pool = next(
        p
        for p in body["pools"]
        if (p["region"], p["family"], p["market"]) == ("eu-west-1", "G", "spot")
    )
    assert (pool["limit_vcpus"], pool["used_vcpus"], pool["available_vcpus"]) == (400, 380, 20)
    assert pool["quota_code"] == "L-3819A6DF"


# Submit.


def submit(client, settings, model_name: str, **options):
    data = support.jsonl([support.request_line(f"req-{i}", max_tokens=64) for i in range(12)])
    uri = support.upload(settings.bucket, "inputs/plan-submit.jsonl", data)
    body = {"model_name": model_name, "input_file": uri, "chunk_size": 4, **options}
    return support.post(client, "/submit/batch", body)


def job_count(settings) -> int:
    from chalicelib import aws

    return aws.client("dynamodb").scan(TableName=settings.jobs_table, Select="COUNT")["Count"]


def test_submit_stores_ranked_placements(client, aws_account):
    response = submit(client, aws_account, "meta-llama/Llama-3.1-8B-Instruct")
    assert response.status_code == 200, response.body
    assert response.json_body["placement"]["rank"] == 1
    job = support.get(client, f"/job/{response.json_body['job_id']}").json_body
    assert job["placement_solver"] == "roofline"
    assert 1 <= len(job["placements"]) <= placement.JOB_PLACEMENTS
    assert [p["rank"] for p in job["placements"]] == list(range(1, len(job["placements"]) + 1))
    # "Say hello." is 10 characters, an estimated 2 prompt tokens, planned as 2 x 1.5 + 64 = 67
    # for the chat template. With max_tokens 64 that is 131, rounded up to 256.
    assert job["placements"][0]["max_model_len"] == 256


def test_submit_user_specified_infeasible_is_409(client, aws_account):
    response = submit(
        client,
        aws_account,
        "meta-llama/Llama-3.1-70B-Instruct",
        placement_solver="user_specified",
        gpu_type="A10G",
        tp_size=1,
    )
    assert response.status_code == 409, response.body
    message = response.json_body["message"]
    assert "infeasible" in message
    assert "GiB" in message
    assert "force" in message
    assert job_count(aws_account) == 0


def test_submit_infeasible_with_force_accepted(client, aws_account):
    response = submit(
        client,
        aws_account,
        "meta-llama/Llama-3.1-70B-Instruct",
        placement_solver="user_specified",
        gpu_type="A10G",
        tp_size=1,
        force=True,
    )
    assert response.status_code == 200, response.body
    assert "no placement fits" in response.json_body["placement_warning"]
    assert response.json_body["placement"] is None


def test_submit_user_specified_feasible(client, aws_account):
    response = submit(
        client,
        aws_account,
        "meta-llama/Llama-3.1-70B-Instruct",
        placement_solver="user_specified",
        gpu_type="L40S",
        tp_size=4,
    )
    assert response.status_code == 200, response.body
    top = response.json_body["placement"]
    assert (top["gpu_type"], top["tp_size"], top["pp_size"]) == ("L40S", 4, 1)


def test_submit_unknown_model_is_accepted_without_plan(client, aws_account):
    response = submit(client, aws_account, "org/Tiny-1B")
    assert response.status_code == 200, response.body
    assert "no placement was planned" in response.json_body["placement_warning"]
    assert "model_architecture" in response.json_body["placement_warning"]
    assert "placement" not in response.json_body


def test_submit_unknown_model_with_solver_is_400(client, aws_account):
    response = submit(client, aws_account, "org/Tiny-1B", placement_solver="roofline")
    assert response.status_code == 400
    assert "model_architecture" in response.json_body["message"]
    assert job_count(aws_account) == 0


def test_background_infeasible_placement_fails_job(client, aws_account, monkeypatch):
    monkeypatch.setenv("TANDEMN_SYNC_VALIDATION_MAX_BYTES", "10")
    response = submit(
        client,
        aws_account,
        "meta-llama/Llama-3.1-70B-Instruct",
        placement_solver="user_specified",
        gpu_type="A10G",
    )
    assert response.status_code == 200
    assert response.json_body["status"] == "validating"
    job = support.get(client, f"/job/{response.json_body['job_id']}").json_body
    assert job["status"] == "failed"
    assert "infeasible" in job["failure_reason"]


def test_background_validation_stores_placements(client, aws_account, monkeypatch):
    monkeypatch.setenv("TANDEMN_SYNC_VALIDATION_MAX_BYTES", "10")
    response = submit(client, aws_account, "Qwen/Qwen3-8B")
    job = support.get(client, f"/job/{response.json_body['job_id']}").json_body
    assert job["status"] == "queued"
    assert job["placements"][0]["rank"] == 1


# CLI: `tandemn plan` against the in-process app, through an httpx transport.


def test_cli_plan_prints_table_and_json(client, aws_account, monkeypatch):
    from tandemn import cli
    from tandemn.api_client import ApiClient

    def forward(request: httpx.Request) -> httpx.Response:
        answer = client.http.request(
            request.method,
            request.url.raw_path.decode(),
            headers=dict(request.headers),
            body=request.content,
        )
        return httpx.Response(answer.status_code, content=answer.body)

    def make_client(api_url):
        api = ApiClient("http://127.0.0.1:9")
        api._http = httpx.Client(base_url=api.base_url, transport=httpx.MockTransport(forward))
        return api

    monkeypatch.setattr(cli, "_client", make_client)
    data = support.jsonl([support.request_line(f"c{i}", max_tokens=32) for i in range(8)])
    uri = support.upload(aws_account.bucket, "inputs/cli-plan.jsonl", data)
    runner = CliRunner()

    table = runner.invoke(cli.app, ["plan", "meta-llama/Llama-3.1-8B-Instruct", uri, "--slo", "2"])
    assert table.exit_code == 0, table.output
    assert "8 requests" in table.output
    assert "us-" in table.output or "eu-" in table.output or "ap-" in table.output

    as_json = runner.invoke(
        cli.app, ["plan", "meta-llama/Llama-3.1-8B-Instruct", uri, "--json", "--limit", "3"]
    )
    assert as_json.exit_code == 0, as_json.output
    result = json.loads(as_json.output)
    assert len(result["placements"]) == 3

    uploaded = []
    monkeypatch.setattr(ApiClient, "upload", lambda self, path: uploaded.append(path) or uri)
    local = runner.invoke(cli.app, ["plan", "meta-llama/Llama-3.1-8B-Instruct", __file__])
    assert local.exit_code == 0, local.output
    assert len(uploaded) == 1

    unknown = runner.invoke(cli.app, ["plan", "org/Tiny-1B", uri], env={"COLUMNS": "400"})
    assert unknown.exit_code == 1
    # The CLI names its own option where the API names the field.
    assert "pass its config.json with --model-architecture" in unknown.output
