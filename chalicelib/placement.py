"""Placement solver: where a job runs, and the ranked fallbacks.

The solver enumerates instance type x tp_size x pp_size x market x region. It keeps the
configurations whose weights and KV cache fit (``roofline.memory_fit``) and sizes their replicas
so the workload's tokens finish before the deadline (``roofline.replica_throughput``). Then it
prices each region and market and caps the replicas by the free vCPU quota. Ranking: placements
that meet the deadline first, then the cheapest total cost, spot before on-demand at equal
cost, then the shorter runtime and the region with more free quota.

Every configuration the solver leaves out is listed in ``dropped`` with its reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from chalicelib import catalog, prices, quotas, roofline, storage, validation
from chalicelib.catalog import InstanceType, ModelArchitecture
from chalicelib.config import Settings
from chalicelib.errors import Conflict, InvalidInput, InvalidRequest
from chalicelib.models import SubmitBatchRequest
from chalicelib.roofline import MemoryFit, Rejection, StepEstimate, Workload

TP_SIZES = (1, 2, 4, 8)
PP_SIZES = (1, 2, 3, 4)
MARKETS = ("spot", "on_demand")
# A job never gets more replicas than this from the solver.
MAX_REPLICAS = 64
# Placements stored on a job item (the launcher tries them in order).
JOB_PLACEMENTS = 10
# Output length assumed when neither the request nor the file states one.
DEFAULT_OUTPUT_TOKENS = 512
# Maximum output length planned for when no request in the file sets max_tokens. It sizes
# max_model_len.
DEFAULT_MAX_OUTPUT_TOKENS = 2048
# Prompt lengths read from a file are estimates (characters / 4) that leave out the chat
# template, so the context planned for them (max_model_len) adds this factor and these tokens.
ESTIMATED_PROMPT_FACTOR = 1.5
CHAT_TEMPLATE_TOKENS = 64
# max_model_len is rounded up to a multiple of this many tokens.
MAX_MODEL_LEN_STEP = 256
# Runtimes within this many seconds of the deadline count as meeting it (float rounding).
DEADLINE_SLACK_SECONDS = 1e-6


@dataclass(frozen=True, slots=True)
class Options:
    regions: tuple[str, ...]
    markets: tuple[str, ...] = MARKETS
    gpu_types: frozenset[str] | None = None
    tp_size: int | None = None
    pp_size: int | None = None
    max_replicas: int = MAX_REPLICAS


@dataclass
class _Config:
    """One instance type x tp_size x pp_size that fits, with its replica count for the deadline."""

    instance: InstanceType
    tp: int
    pp: int
    fit: MemoryFit
    startup_seconds: float
    # The job's tail, when the last and longest requests decode in small batches.
    drain_seconds: float
    replicas: int
    reaches_deadline: bool
    _runs: dict[int, tuple[float, StepEstimate]] = field(default_factory=dict)


@dataclass
class Solution:
    placements: list[dict[str, Any]]
    dropped: list[dict[str, Any]]
    max_model_len: int
    warnings: list[str]
    sources: dict[str, Any]

    # Configurations (instance type x tp x pp) whose weights and KV cache fit.
    fitting_configs: int = 0

    def infeasibility(self) -> str:
        """Returns why nothing was placed, as one sentence.

        When some configuration fits in memory, the reasons are the later checks (quota,
        prices, regions, deadline), counted over regions and markets. Otherwise they are the
        memory and sharding reasons of the largest configurations, the closest to fitting.
        """
        if not self.dropped:
            return "no instance type in the catalog matches the requested GPU type and sizes"
        if self.fitting_configs:
            counts: dict[str, int] = {}
            for entry in self.dropped:
                if entry["stage"] in ("quota", "price", "region", "deadline"):
                    regions = entry["regions"] or [None]
                    counts[entry["code"]] = counts.get(entry["code"], 0) + len(regions)
            texts = [
                f"{_LATE_REASONS.get(code, code)} ({count} candidates)"
                for code, count in sorted(counts.items(), key=lambda item: -item[1])
            ]
            fastest = [e["minimum_hours"] for e in self.dropped if "minimum_hours" in e]
            if fastest:
                texts.append(f"none can finish in under about {min(fastest)} h")
            return f"{self.fitting_configs} configurations fit in memory, but " + "; ".join(texts)
        by_size = sorted(
            self.dropped,
            key=lambda d: (
                -(
                    catalog.instance_by_name()[d["instance_type"]].gpu.memory_gib
                    * d["tp_size"]
                    * d["pp_size"]
                )
            ),
        )
        shapes_by_reason: dict[str, list[str]] = {}
        for entry in by_size:
            shape = f"{entry['instance_type']} tp{entry['tp_size']} pp{entry['pp_size']}"
            shapes_by_reason.setdefault(entry["reason"], []).append(shape)
        texts = [
            f"{', '.join(shapes)}: {reason}"
            for reason, shapes in list(shapes_by_reason.items())[:3]
        ]
        return "; ".join(texts)


_LATE_REASONS = {
    "quota": "the free vCPU quota holds no replica",
    "no_spot_price": "no spot price is known",
    "no_on_demand_price": "no on-demand price is known",
    "not_offered": "the instance type is not offered in the region",
    "deadline_startup": "start-up and the longest request take longer than the deadline",
}


def _dropped(
    stage: str,
    instance: InstanceType,
    tp: int,
    pp: int,
    rejection: Rejection,
    region: str | None = None,
    market: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    entry = {
        "instance_type": instance.instance_type,
        "gpu_type": instance.gpu_type,
        "tp_size": tp,
        "pp_size": pp,
        # None: every region (the reason does not depend on the region).
        "regions": None if region is None else [region],
        "market": market,
        "stage": stage,
        "code": rejection.code,
        "reason": rejection.message,
    }
    entry.update(extra)
    return entry


def _run(config: _Config, arch: ModelArchitecture, workload: Workload, replicas: int):
    """Returns (runtime seconds, per-replica estimate) of ``replicas`` replicas, memoised."""
    found = config._runs.get(replicas)
    if found is None:
        estimate = roofline.replica_throughput(
            arch,
            config.instance,
            config.tp,
            config.pp,
            workload,
            config.fit.kv_capacity_tokens,
            request_cap=math.ceil(workload.num_requests / replicas),
        )
        steady = workload.total_tokens / (replicas * estimate.tokens_per_second)
        seconds = config.startup_seconds + steady + config.drain_seconds
        found = (seconds, estimate)
        config._runs[replicas] = found
    return found


def _size_replicas(
    config: _Config, arch: ModelArchitecture, workload: Workload, deadline: float, limit: int
) -> None:
    """Sets the fewest replicas that finish by ``deadline``, or ``limit`` if none do.

    More replicas never slow a job down (each runs a smaller batch, but they run in
    parallel), so the runtime falls as replicas grow and a binary search finds the fewest.
    """
    if _run(config, arch, workload, limit)[0] > deadline + DEADLINE_SLACK_SECONDS:
        config.replicas, config.reaches_deadline = limit, False
        return
    low, high = 1, limit
    while low < high:
        middle = (low + high) // 2
        if _run(config, arch, workload, middle)[0] <= deadline + DEADLINE_SLACK_SECONDS:
            high = middle
        else:
            low = middle + 1
    config.replicas, config.reaches_deadline = low, True


def _configs(
    arch: ModelArchitecture,
    workload: Workload,
    max_model_len: int,
    deadline: float,
    options: Options,
    dropped: list[dict[str, Any]],
) -> list[_Config]:
    configs = []
    for instance in catalog.instance_types():
        if options.gpu_types is not None and instance.gpu_type not in options.gpu_types:
            continue
        for tp in TP_SIZES:
            if options.tp_size is not None and tp != options.tp_size:
                continue
            for pp in PP_SIZES:
                if options.pp_size is not None and pp != options.pp_size:
                    continue
                problem = roofline.parallelism_problem(arch, instance, tp, pp)
                if problem is not None:
                    # Shapes outside the enumeration (tp above the GPU count, pipelines that
                    # leave GPUs idle) are listed only when the request names a tp or pp size.
                    requested_shape = options.tp_size is not None or options.pp_size is not None
                    if requested_shape or problem.code not in (
                        "tp_exceeds_gpus",
                        "pp_needs_full_node",
                    ):
                        dropped.append(_dropped("parallelism", instance, tp, pp, problem))
                    continue
                fit = roofline.memory_fit(arch, instance, tp, pp, max_model_len)
                if isinstance(fit, Rejection):
                    dropped.append(_dropped("memory", instance, tp, pp, fit))
                    continue
                startup = roofline.startup_seconds(arch, tp, pp)
                drain = roofline.drain_seconds(arch, instance, tp, pp, workload)
                if startup + drain >= deadline:
                    rejection = Rejection(
                        "deadline_startup",
                        f"start-up (about {startup / 60:.0f} min) and the longest request alone "
                        f"(about {drain / 60:.0f} min) take longer than the deadline",
                    )
                    dropped.append(
                        _dropped(
                            "deadline",
                            instance,
                            tp,
                            pp,
                            rejection,
                            minimum_hours=round((startup + drain) / 3600, 2),
                        )
                    )
                    continue
                config = _Config(instance, tp, pp, fit, startup, drain, 1, False)
                _size_replicas(config, arch, workload, deadline, options.max_replicas)
                configs.append(config)
    return configs


def _price_and_quota(
    config: _Config,
    arch: ModelArchitecture,
    workload: Workload,
    deadline: float,
    options: Options,
    book: prices.PriceBook,
    free: dict[tuple[str, str, str], int],
    max_model_len: int,
    placements: list[dict[str, Any]],
    dropped: list[dict[str, Any]],
) -> None:
    instance, tp, pp = config.instance, config.tp, config.pp
    vcpus_per_replica = instance.vcpus * pp
    for region in options.regions:
        if not book.is_offered(region, instance.instance_type):
            rejection = Rejection(
                "not_offered", f"{instance.instance_type} is not offered in these regions"
            )
            dropped.append(_dropped("region", instance, tp, pp, rejection, region))
            continue
        for market in options.markets:
            price = book.price(region, instance.instance_type, market)
            if price is None:
                price_name = "spot price" if market == "spot" else "on-demand price"
                rejection = Rejection(
                    f"no_{market}_price",
                    f"no {price_name} is known for {instance.instance_type} in these regions",
                )
                dropped.append(_dropped("price", instance, tp, pp, rejection, region, market))
                continue
            pool = free.get((region, instance.quota_family, market), 0)
            fitting = pool // vcpus_per_replica
            if fitting == 0:
                rejection = Rejection(
                    "quota",
                    f"one replica needs {vcpus_per_replica} vCPUs but the {instance.quota_family} "
                    f"{market} quota in {region} has {pool} free",
                )
                dropped.append(
                    _dropped("quota", instance, tp, pp, rejection, region, market, free_vcpus=pool)
                )
                continue
            replicas = min(config.replicas, fitting)
            limited_by = None
            if replicas < config.replicas:
                limited_by = "quota"
            elif not config.reaches_deadline:
                limited_by = "max_replicas"
            seconds, estimate = _run(config, arch, workload, replicas)
            cost_per_hour = price.usd_per_hour * pp * replicas
            total_cost = cost_per_hour * seconds / 3600
            placements.append(
                {
                    "instance_type": instance.instance_type,
                    "gpu_type": instance.gpu_type,
                    "gpus_per_instance": instance.gpu_count,
                    "tp_size": tp,
                    "pp_size": pp,
                    "num_instances": pp,
                    "replicas": replicas,
                    "market": market,
                    "region": region,
                    "max_model_len": max_model_len,
                    "throughput_tokens_per_sec": round(estimate.tokens_per_second * replicas, 1),
                    "replica_tokens_per_sec": round(estimate.tokens_per_second, 1),
                    "replica_output_tokens_per_sec": round(estimate.output_tokens_per_second, 1),
                    "batch_per_replica": round(estimate.batch, 1),
                    "bound": estimate.bound,
                    "price_per_instance_hour": round(price.usd_per_hour, 5),
                    "price_source": price.source,
                    "spot_zone": price.zone,
                    "cost_per_hour": round(cost_per_hour, 4),
                    "total_cost": round(total_cost, 4),
                    "cost_per_million_tokens": round(total_cost / (workload.total_tokens / 1e6), 4),
                    "estimated_runtime_hours": round(seconds / 3600, 4),
                    "meets_slo": seconds <= deadline + DEADLINE_SLACK_SECONDS,
                    "limited_by": limited_by,
                    "vcpus_per_replica": vcpus_per_replica,
                    "free_vcpus": pool,
                    "weights_gib_per_gpu": round(config.fit.weights_gib, 2),
                    "kv_cache_gib_per_gpu": round(config.fit.kv_cache_gib, 2),
                    "kv_capacity_tokens": config.fit.kv_capacity_tokens,
                    "_sort_cost": total_cost,
                    "_sort_seconds": seconds,
                }
            )


def _merge_regions(dropped: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merges region-independent reasons (not offered, no price) of one configuration and
    market into one entry listing the regions."""
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    result = []
    for entry in dropped:
        if entry["stage"] in ("region", "price"):
            key = (
                entry["instance_type"],
                entry["tp_size"],
                entry["pp_size"],
                entry["market"],
                entry["code"],
            )
            if key in merged:
                merged[key]["regions"].extend(entry["regions"])
                continue
            merged[key] = entry
        result.append(entry)
    return result


def _rank(placements: list[dict[str, Any]]) -> None:
    placements.sort(
        key=lambda p: (
            not p["meets_slo"],
            round(p["_sort_cost"], 6),
            p["market"] != "spot",
            p["_sort_seconds"],
            -p["free_vcpus"],
            p["region"],
            p["instance_type"],
            p["tp_size"],
            p["pp_size"],
        )
    )
    for index, placement in enumerate(placements):
        placement.pop("_sort_cost")
        placement.pop("_sort_seconds")
        placement["rank"] = index + 1
        placement["is_fallback"] = index > 0


def max_model_len_for(arch: ModelArchitecture, workload: Workload) -> tuple[int, list[str]]:
    """Returns the context to serve, with a warning when requests need more than the model
    supports.

    The context is the longest prompt plus the longest output, rounded up to a multiple of
    MAX_MODEL_LEN_STEP, and at most the model's maximum.
    """
    needed = workload.max_input_tokens + workload.max_output_tokens
    rounded = math.ceil(needed / MAX_MODEL_LEN_STEP) * MAX_MODEL_LEN_STEP
    if needed > arch.max_position_embeddings:
        warning = (
            f"requests need up to {needed} tokens of context (longest prompt plus longest "
            f"output) but {arch.name} supports {arch.max_position_embeddings}; longer requests "
            "will fail at the engine"
        )
        return arch.max_position_embeddings, [warning]
    return min(rounded, arch.max_position_embeddings), []


def solve(
    arch: ModelArchitecture,
    workload: Workload,
    deadline_hours: float,
    options: Options,
    quota_source: quotas.QuotaSource,
    price_source: prices.PriceSource,
) -> Solution:
    """Ranks every placement of ``arch`` for ``workload`` and lists the dropped ones."""
    deadline = deadline_hours * 3600
    max_model_len, warnings = max_model_len_for(arch, workload)
    dropped: list[dict[str, Any]] = []
    configs = _configs(arch, workload, max_model_len, deadline, options, dropped)
    placements: list[dict[str, Any]] = []
    if configs:
        types = sorted({c.instance.instance_type for c in configs})
        book = price_source.price_book(options.regions, types)
        warnings.extend(book.errors)
        pools = quota_source.pools(options.regions)
        warnings.extend(
            f"{p.region} {p.family} {p.market} quota: {p.error}" for p in pools if p.error
        )
        free = quotas.free_vcpus(pools)
        for config in configs:
            _price_and_quota(
                config,
                arch,
                workload,
                deadline,
                options,
                book,
                free,
                max_model_len,
                placements,
                dropped,
            )
    _rank(placements)
    dropped = _merge_regions(dropped)
    sources = {"quota_source": quota_source.name, "price_source": price_source.name}
    # A configuration whose start-up outlasts the deadline still fits in memory, so the reason
    # reported for an empty result is the deadline, not the memory of the largest shapes.
    too_slow = sum(1 for entry in dropped if entry["code"] == "deadline_startup")
    return Solution(
        placements, dropped, max_model_len, warnings, sources, len(configs) + too_slow
    )


# Request handling: /test/placement, POST /submit/batch and GET /resources.


def workload_from_stats(
    num_requests: int,
    avg_input_tokens: float,
    max_input_tokens: int,
    avg_output_tokens: float | None,
    file_max_output_tokens: int | None,
    max_output_cap: int | None,
    *,
    estimated_prompts: bool = False,
) -> tuple[Workload, dict[str, Any]]:
    """Builds the workload and its view for responses.

    The average output length is the first of: the request's avg_output_tokens, the largest
    max_tokens in the file (an upper bound), the request's max_output_tokens, or
    DEFAULT_OUTPUT_TOKENS. The view's ``avg_output_tokens_source`` names the one used. With
    ``estimated_prompts`` (token counts from a file), the longest prompt planned for gets
    ESTIMATED_PROMPT_FACTOR and CHAT_TEMPLATE_TOKENS.
    """
    caps = [v for v in (file_max_output_tokens, max_output_cap) if v]
    longest = min(caps) if caps else None
    if avg_output_tokens:
        average, source = float(avg_output_tokens), "request"
    elif file_max_output_tokens:
        average, source = float(longest or file_max_output_tokens), "max_tokens_in_file"
    elif max_output_cap:
        average, source = float(max_output_cap), "max_output_tokens"
    else:
        average, source = float(DEFAULT_OUTPUT_TOKENS), "default"
    if longest is None:
        longest = max(math.ceil(average), DEFAULT_MAX_OUTPUT_TOKENS)
    average = min(average, float(longest))
    longest_prompt = max(int(max_input_tokens), math.ceil(avg_input_tokens), 1)
    planned_prompt = longest_prompt
    if estimated_prompts:
        planned_prompt = math.ceil(longest_prompt * ESTIMATED_PROMPT_FACTOR) + CHAT_TEMPLATE_TOKENS
    workload = Workload(
        num_requests=num_requests,
        avg_input_tokens=max(float(avg_input_tokens), 1.0),
        max_input_tokens=planned_prompt,
        avg_output_tokens=max(average, 1.0),
        max_output_tokens=max(int(longest), 1),
    )
    view = {
        "num_lines": workload.num_requests,
        "avg_input_tokens": round(workload.avg_input_tokens, 1),
        "max_input_tokens": longest_prompt,
        "max_input_tokens_planned": planned_prompt,
        "avg_output_tokens": round(workload.avg_output_tokens, 1),
        "avg_output_tokens_source": source,
        "max_output_tokens": workload.max_output_tokens,
        "total_tokens": round(workload.total_tokens),
    }
    return workload, view


def _options(
    regions: Sequence[str],
    gpu_type: str | None,
    tp_size: int | None,
    pp_size: int | None,
    on_demand: bool | None,
    max_replicas: int,
) -> Options:
    return Options(
        regions=tuple(regions),
        markets=("on_demand",) if on_demand else MARKETS,
        gpu_types=frozenset(catalog.match_gpu_type(gpu_type)) if gpu_type else None,
        tp_size=tp_size,
        pp_size=pp_size,
        max_replicas=max(1, min(MAX_REPLICAS, max_replicas)),
    )


def _solve_with_env(
    arch: ModelArchitecture, workload: Workload, deadline_hours: float, options: Options
) -> Solution:
    return solve(
        arch,
        workload,
        deadline_hours,
        options,
        quotas.source_from_env(),
        prices.source_from_env(),
    )


def _stats_from_file(settings: Settings, input_file: str) -> validation.InputStats:
    bucket, key = storage.parse_s3_uri(input_file)
    head = storage.head_object(bucket, key)
    if head is None:
        raise InvalidRequest(
            f"input_file {input_file} was not found or is not readable; upload it first",
            field="input_file",
        )
    size = int(head["ContentLength"])
    if size > settings.sync_validation_max_bytes:
        raise InvalidRequest(
            f"input_file {input_file} is {size} bytes, more than the {settings.sync_validation_max_bytes} "
            "bytes read within one request; give num_lines, avg_input_tokens, max_input_tokens "
            "and avg_output_tokens instead",
            field="input_file",
        )
    result = validation.validate_and_split(storage.open_object(bucket, key), 1000, total_bytes=size)
    if not result.ok:
        first = result.errors[0]
        raise InvalidInput(
            f"input file {input_file} is invalid: {first.message}",
            errors=[
                {"line": e.line, "field": e.field, "message": e.message} for e in result.errors
            ],
            truncated=result.truncated,
        )
    return result.stats


def _direct_stats(request: Any) -> tuple[int, float, int]:
    missing = [
        name
        for name in ("num_lines", "avg_input_tokens", "avg_output_tokens")
        if getattr(request, name) is None
    ]
    if missing:
        raise InvalidRequest(
            f"field {missing[0]!r} is required when input_file is not given; give input_file "
            "(s3://bucket/key) or num_lines, avg_input_tokens, max_input_tokens and "
            "avg_output_tokens",
            field=missing[0],
        )
    max_input = request.max_input_tokens or math.ceil(request.avg_input_tokens)
    if max_input < request.avg_input_tokens:
        raise InvalidRequest(
            f"max_input_tokens {max_input} is less than avg_input_tokens "
            f"{request.avg_input_tokens}; the longest prompt cannot be shorter than the average",
            field="max_input_tokens",
        )
    return request.num_lines, request.avg_input_tokens, max_input


def _request_workload(settings: Settings, request: Any) -> tuple[Workload, dict[str, Any]]:
    """Returns the workload of a ``PlacementRequest``: from its input file or its statistics."""
    direct = [
        name
        for name in ("num_lines", "avg_input_tokens", "max_input_tokens")
        if getattr(request, name) is not None
    ]
    if request.input_file and direct:
        raise InvalidRequest(
            f"give either input_file or the statistics ({', '.join(direct)}), not both",
            field=direct[0],
        )
    if request.input_file:
        stats = _stats_from_file(settings, request.input_file)
        workload, view = workload_from_stats(
            stats.num_requests,
            stats.avg_input_tokens,
            stats.max_input_tokens,
            request.avg_output_tokens,
            stats.max_requested_output_tokens,
            request.max_output_tokens,
            estimated_prompts=True,
        )
        view["token_counts"] = "estimated from the file as characters / 4"
        return workload, view
    num_lines, avg_input, max_input = _direct_stats(request)
    return workload_from_stats(
        num_lines, avg_input, max_input, request.avg_output_tokens, None, request.max_output_tokens
    )


def placement_for_request(settings: Settings, request: Any) -> dict[str, Any]:
    """Runs the solver for ``POST /test/placement`` (a ``PlacementRequest``)."""
    spec = request.model_architecture.model_dump() if request.model_architecture else None
    arch = catalog.resolve_model(request.model_name, spec)
    solver = request.placement_solver or "roofline"
    tp, pp = request.tp_size, request.pp_size
    if solver == "user_specified":
        if not request.gpu_type:
            raise InvalidRequest(
                "placement_solver user_specified needs gpu_type (and tp_size, pp_size; default 1)",
                field="gpu_type",
            )
        tp, pp = tp or 1, pp or 1
    workload, view = _request_workload(settings, request)

    options = _options(
        quotas.regions_from_env(),
        request.gpu_type,
        tp,
        pp,
        request.on_demand,
        workload.num_requests,
    )
    solution = _solve_with_env(arch, workload, request.slo_deadline_hours, options)
    view["max_model_len"] = solution.max_model_len

    response = {
        "status": "ok",
        "solver": solver,
        "feasible": bool(solution.placements),
        "model": arch.view(),
        "slo_deadline_hours": request.slo_deadline_hours,
        "input_stats": view,
        "regions": list(options.regions),
        **solution.sources,
        "placements_total": len(solution.placements),
        "placements": solution.placements[: request.limit],
        "dropped": solution.dropped,
        "warnings": solution.warnings,
    }
    if not solution.placements:
        response["reason"] = solution.infeasibility()
    return response


# Errors of plan_for_job that reject the job (a background validation fails the job with them).
PLAN_ERRORS = (InvalidRequest, Conflict)


# Keys of a placement stored on the job item; the launcher reads gpu_type, instance_type,
# tp_size, pp_size, region and market.
_JOB_KEYS = (
    "rank",
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
    "price_source",
)


def plan_for_job(settings: Settings, request: Any, stats: validation.InputStats) -> dict[str, Any]:
    """Plans a submitted job (a ``SubmitBatchRequest`` whose input validated as ``stats``).

    Returns the fields to store on the job item: ``placements`` (the top JOB_PLACEMENTS),
    ``placement_solver`` and, when the plan is missing or misses the deadline,
    ``placement_warning``. A model outside the catalog without ``model_architecture`` is not
    planned (the warning explains why) unless the request names a solver, which is a 400. With
    ``placement_solver`` "user_specified", an infeasible gpu_type/tp_size/pp_size is a 409
    unless ``force`` is true.
    """
    solver = request.placement_solver
    spec = request.model_architecture.model_dump() if request.model_architecture else None
    arch = catalog.find_model(request.model_name) if spec is None else None
    if spec is None and arch is None:
        message = catalog.unknown_model_message(request.model_name)
        if solver is None or (solver == "user_specified" and request.force):
            return {"placement_warning": f"no placement was planned: {message}"}
        raise InvalidRequest(message, field="model_name")
    if arch is None:
        arch = catalog.architecture_from_request(request.model_name, spec)
    if solver == "user_specified" and not request.gpu_type:
        raise InvalidRequest(
            "placement_solver user_specified needs gpu_type (and tp_size, pp_size; default 1)",
            field="gpu_type",
        )
    workload, _ = workload_from_stats(
        stats.num_requests,
        stats.avg_input_tokens,
        stats.max_input_tokens,
        request.avg_output_tokens,
        stats.max_requested_output_tokens,
        request.max_output_tokens,
        estimated_prompts=True,
    )
    tp, pp = request.tp_size, request.pp_size
    if solver == "user_specified":
        tp, pp = tp or 1, pp or 1
    chunk_count = math.ceil(stats.num_requests / request.chunk_size)
    options = _options(
        quotas.regions_from_env(),
        request.gpu_type,
        tp,
        pp,
        True if request.on_demand else None,
        chunk_count,
    )
    solution = _solve_with_env(arch, workload, request.slo_deadline_hours, options)
    fields: dict[str, Any] = {
        "placement_solver": solver or "roofline",
        "placements": [
            {key: p[key] for key in _JOB_KEYS} for p in solution.placements[:JOB_PLACEMENTS]
        ],
    }
    warnings = list(solution.warnings)
    if not solution.placements:
        reason = solution.infeasibility()
        shape = f"{request.gpu_type} tp_size {tp} pp_size {pp}"
        if solver == "user_specified" and not request.force:
            raise Conflict(
                f"the requested placement {shape} is infeasible for {arch.name}: {reason}; "
                "choose another gpu_type, tp_size or pp_size, or pass force: true to submit "
                "anyway",
                field="gpu_type",
                dropped=solution.dropped[:20],
            )
        warnings.insert(0, f"no placement fits: {reason}")
    elif not solution.placements[0]["meets_slo"]:
        top = solution.placements[0]
        warnings.insert(
            0,
            f"no placement meets the {request.slo_deadline_hours} h deadline; the best "
            f"estimate is {top['estimated_runtime_hours']} h on {top['replicas']} x "
            f"{top['instance_type']} ({top['limited_by'] or 'throughput'})",
        )
    if warnings:
        fields["placement_warning"] = "; ".join(warnings[:3])
    return fields


def stored_request(job: dict[str, Any]) -> SubmitBatchRequest:
    """Rebuilds the submit request of a job that was validated in the background."""
    requested = {k: v for k, v in (job.get("requested") or {}).items() if v is not None}
    return SubmitBatchRequest.model_validate(
        {**requested, "model_name": job["model_name"], "input_file": job["input_file"]}
    )


def response_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Returns the submit response's view of a plan: the first placement and any warning."""
    view: dict[str, Any] = {}
    if "placements" in fields:
        view["placement"] = fields["placements"][0] if fields["placements"] else None
    if fields.get("placement_warning"):
        view["placement_warning"] = fields["placement_warning"]
    return view


def resources_view() -> dict[str, Any]:
    """Shapes ``GET /resources``: the instance catalog, the models and the quota pools."""
    sources, instances = catalog.instance_catalog()
    regions = quotas.regions_from_env()
    quota_source = quotas.source_from_env()
    return {
        "instances": [instance.view(sources) for instance in instances],
        "gpu_types": catalog.gpu_types(),
        "models": catalog.model_ids(),
        "regions": list(regions),
        "quota": quotas.status_view(quota_source, regions),
    }
