"""EC2 vCPU quotas per region, instance family and market, minus what the project already runs.

AWS limits GPU instances by running vCPUs per region in four pools: on-demand and spot for the
G and VT families, and on-demand and spot for the P families (P4, P5 and P6 share the P pools).
``AwsQuotaSource`` reads the limits from Service Quotas and subtracts the vCPUs of the project's
own pending and running instances (instances tagged ``PROJECT_TAG_KEY``). ``StaticQuotaSource``
serves fixed values for tests and the local stack, where moto has no EC2 service quotas.
``TANDEMN_QUOTA_SOURCE`` selects one ("aws", the default, or "static").
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib import aws
from chalicelib.errors import ControlPlaneError

logger = logging.getLogger(__name__)

DEFAULT_REGIONS = (
    "us-east-1",
    "us-east-2",
    "us-west-1",
    "us-west-2",
    "eu-west-1",
    "eu-central-1",
    "ap-northeast-1",
    "ap-southeast-2",
)
FAMILIES = ("G", "P")
MARKETS = ("spot", "on_demand")
# Service Quotas codes of the EC2 service ("ec2"), in vCPUs.
QUOTA_CODES = {
    ("G", "on_demand"): "L-DB2E81BA",  # Running On-Demand G and VT instances
    ("G", "spot"): "L-3819A6DF",  # All G and VT Spot Instance Requests
    ("P", "on_demand"): "L-417A185B",  # Running On-Demand P instances
    ("P", "spot"): "L-7212CCBC",  # All P Spot Instance Requests
}
# Instances carrying this tag key are the project's own; launchers must set it.
PROJECT_TAG_KEY = "tandemn:job-id"
QUOTA_CACHE_SECONDS = 60.0


class SourceConfigError(ControlPlaneError):
    """A quota or price source is misconfigured: an operator error, so a 500."""

    code = "source_config_invalid"


@dataclass(frozen=True, slots=True)
class QuotaPool:
    region: str
    family: str
    market: str
    limit_vcpus: int
    used_vcpus: int
    source: str
    # Set when the pool could not be read; the pool then counts as having no free capacity.
    error: str | None = None

    @property
    def available_vcpus(self) -> int:
        return max(0, self.limit_vcpus - self.used_vcpus)

    def view(self) -> dict[str, Any]:
        view = {
            "region": self.region,
            "family": self.family,
            "market": self.market,
            "quota_code": QUOTA_CODES[(self.family, self.market)],
            "limit_vcpus": self.limit_vcpus,
            "used_vcpus": self.used_vcpus,
            "available_vcpus": self.available_vcpus,
            "source": self.source,
        }
        if self.error:
            view["error"] = self.error
        return view


class QuotaSource(Protocol):
    name: str

    def pools(self, regions: Sequence[str]) -> list[QuotaPool]:
        """Returns one pool per region, family and market."""
        ...


def family_of(instance_type: str) -> str | None:
    """Returns the quota family of an instance type: "G" for g* and vt*, "P" for p*."""
    if instance_type.startswith(("g", "vt")):
        return "G"
    if instance_type.startswith("p"):
        return "P"
    return None


class StaticQuotaSource:
    """Fixed quotas from a dict: ``{region or "*": {family: {market: limit or {limit, used}}}}``.

    "*" applies to every region not listed. A missing pool has a limit of 0.
    """

    name = "static"

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = _check_static(data)

    def pools(self, regions: Sequence[str]) -> list[QuotaPool]:
        result = []
        for region in regions:
            entry = self._data.get(region, self._data.get("*", {}))
            for family in FAMILIES:
                for market in MARKETS:
                    limit, used = entry.get(family, {}).get(market, (0, 0))
                    result.append(QuotaPool(region, family, market, limit, used, self.name))
        return result


def _check_static(data: Any) -> dict[str, dict[str, dict[str, tuple[int, int]]]]:
    if not isinstance(data, dict):
        raise SourceConfigError("static quotas must be a JSON object keyed by region")
    checked: dict[str, dict[str, dict[str, tuple[int, int]]]] = {}
    for region, families in data.items():
        if not isinstance(families, dict):
            raise SourceConfigError(f"static quotas for {region} must map G and P to markets")
        checked[region] = {}
        for family, markets in families.items():
            if family not in FAMILIES or not isinstance(markets, dict):
                raise SourceConfigError(
                    f"static quotas for {region}: family {family!r} is not G or P, or its value "
                    "is not an object of spot and on_demand"
                )
            checked[region][family] = {}
            for market, value in markets.items():
                if market not in MARKETS:
                    raise SourceConfigError(
                        f"static quotas for {region} {family}: market {market!r} is not spot or "
                        "on_demand"
                    )
                if isinstance(value, dict):
                    limit, used = value.get("limit", 0), value.get("used", 0)
                else:
                    limit, used = value, 0
                if not all(isinstance(v, int) and v >= 0 for v in (limit, used)):
                    raise SourceConfigError(
                        f"static quotas for {region} {family} {market}: limit and used must be "
                        f"whole vCPU counts of at least 0, got {value!r}"
                    )
                checked[region][family][market] = (limit, used)
    return checked


ClientFactory = Callable[[str, str], Any]


class AwsQuotaSource:
    """Limits from Service Quotas; usage from the project's tagged pending and running instances.

    NOTE: only the project's own instances are subtracted. Other workloads in the account use
    the same pools, so the free capacity shown is an upper bound there.
    """

    name = "aws"

    def __init__(self, client_factory: ClientFactory | None = None) -> None:
        self._client = client_factory or aws.regional_client

    def pools(self, regions: Sequence[str]) -> list[QuotaPool]:
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(regions)))) as pool:
            per_region = list(pool.map(self._region_pools, regions))
        return [p for pools in per_region for p in pools]

    def _region_pools(self, region: str) -> list[QuotaPool]:
        try:
            used = self._used_vcpus(region)
        except (ClientError, BotoCoreError) as error:
            logger.warning(
                "instance usage unreadable", extra={"region": region, "error": str(error)}
            )
            return [
                QuotaPool(
                    region, family, market, 0, 0, self.name, error=f"usage unreadable: {error}"
                )
                for family in FAMILIES
                for market in MARKETS
            ]
        result = []
        for family in FAMILIES:
            for market in MARKETS:
                try:
                    limit = self._limit(region, QUOTA_CODES[(family, market)])
                    pool = QuotaPool(region, family, market, limit, used[(family, market)], "aws")
                except (ClientError, BotoCoreError) as error:
                    logger.warning(
                        "service quota unreadable",
                        extra={
                            "region": region,
                            "family": family,
                            "market": market,
                            "error": str(error),
                        },
                    )
                    pool = QuotaPool(
                        region,
                        family,
                        market,
                        0,
                        used[(family, market)],
                        self.name,
                        error=f"quota unreadable: {error}",
                    )
                result.append(pool)
        return result

    def _limit(self, region: str, code: str) -> int:
        client = self._client("service-quotas", region)
        try:
            quota = client.get_service_quota(ServiceCode="ec2", QuotaCode=code)["Quota"]
        except ClientError as error:
            # An account that never changed a quota may have no applied value: use the default.
            if error.response.get("Error", {}).get("Code") != "NoSuchResourceException":
                raise
            quota = client.get_aws_default_service_quota(ServiceCode="ec2", QuotaCode=code)["Quota"]
        return int(quota["Value"])

    def _used_vcpus(self, region: str) -> dict[tuple[str, str], int]:
        used = {key: 0 for key in QUOTA_CODES}
        paginator = self._client("ec2", region).get_paginator("describe_instances")
        filters = [
            {"Name": "instance-state-name", "Values": ["pending", "running"]},
            {"Name": "tag-key", "Values": [PROJECT_TAG_KEY]},
        ]
        for page in paginator.paginate(Filters=filters):
            for reservation in page.get("Reservations", []):
                for instance in reservation.get("Instances", []):
                    family = family_of(instance.get("InstanceType", ""))
                    if family is None:
                        continue
                    market = "spot" if instance.get("InstanceLifecycle") == "spot" else "on_demand"
                    cpu = instance.get("CpuOptions") or {}
                    vcpus = int(cpu.get("CoreCount", 0)) * int(cpu.get("ThreadsPerCore", 1))
                    used[(family, market)] += vcpus
        return used


class _CachedQuotaSource:
    """Keeps each region's pools for ``QUOTA_CACHE_SECONDS`` so repeated plans stay fast."""

    def __init__(self, inner: QuotaSource, seconds: float) -> None:
        self.inner = inner
        self.name = inner.name
        self._seconds = seconds
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, list[QuotaPool]]] = {}

    def pools(self, regions: Sequence[str]) -> list[QuotaPool]:
        now = time.monotonic()
        with self._lock:
            missing = [r for r in regions if r not in self._cache or self._cache[r][0] < now]
        if missing:
            fresh = self.inner.pools(missing)
            with self._lock:
                for region in missing:
                    pools = [p for p in fresh if p.region == region]
                    self._cache[region] = (now + self._seconds, pools)
        with self._lock:
            return [p for region in regions for p in self._cache[region][1]]


_sources_lock = threading.Lock()
_aws_source: _CachedQuotaSource | None = None


def regions_from_env() -> tuple[str, ...]:
    """Returns ``TANDEMN_REGIONS`` (comma-separated) or the eight default regions."""
    raw = os.environ.get("TANDEMN_REGIONS", "")
    regions = tuple(r.strip() for r in raw.split(",") if r.strip())
    return regions or DEFAULT_REGIONS


def _static_data() -> Any:
    raw = os.environ.get("TANDEMN_QUOTAS")
    path = os.environ.get("TANDEMN_QUOTAS_FILE")
    if raw:
        text, origin = raw, "TANDEMN_QUOTAS"
    elif path:
        if not os.path.isabs(path):
            # Relative to the directory that contains chalicelib/ (the project root, or the
            # Lambda package root), so one stage setting works in both.
            path = os.path.join(os.path.dirname(os.path.dirname(__file__)), path)
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as error:
            raise SourceConfigError(
                f"TANDEMN_QUOTAS_FILE {path} cannot be read: {error}"
            ) from error
        origin = f"TANDEMN_QUOTAS_FILE {path}"
    else:
        raise SourceConfigError(
            "TANDEMN_QUOTA_SOURCE=static needs the quotas in TANDEMN_QUOTAS (JSON) or "
            "TANDEMN_QUOTAS_FILE (path of a JSON file)"
        )
    try:
        return json.loads(text)
    except ValueError as error:
        raise SourceConfigError(f"{origin} is not valid JSON: {error}") from error


def source_from_env() -> QuotaSource:
    """Returns the quota source ``TANDEMN_QUOTA_SOURCE`` selects ("aws" by default).

    The static source reads ``TANDEMN_QUOTAS`` (JSON) or, without it, ``TANDEMN_QUOTAS_FILE``.
    It is rebuilt on every call, so tests and the local stack can change the environment. The
    AWS source is shared and caches each region for a minute.
    """
    global _aws_source
    kind = os.environ.get("TANDEMN_QUOTA_SOURCE", "aws")
    if kind == "static":
        return StaticQuotaSource(_static_data())
    if kind != "aws":
        raise SourceConfigError(f"TANDEMN_QUOTA_SOURCE {kind!r} is not known; use aws or static")
    with _sources_lock:
        if _aws_source is None:
            _aws_source = _CachedQuotaSource(AwsQuotaSource(), QUOTA_CACHE_SECONDS)
        return _aws_source


def free_vcpus(pools: Sequence[QuotaPool]) -> dict[tuple[str, str, str], int]:
    """Maps (region, family, market) to the free vCPUs of that pool."""
    return {(p.region, p.family, p.market): p.available_vcpus for p in pools}


def status_view(source: QuotaSource, regions: Sequence[str]) -> dict[str, Any]:
    """Shapes ``GET /quota/status``: every pool, regions ordered by free vCPUs (most first)."""
    pools = source.pools(regions)
    free_by_region: dict[str, int] = {}
    for pool in pools:
        free_by_region[pool.region] = free_by_region.get(pool.region, 0) + pool.available_vcpus
    order = sorted(regions, key=lambda region: (-free_by_region.get(region, 0), region))
    rank = {region: index for index, region in enumerate(order)}
    ordered = sorted(
        pools, key=lambda p: (rank[p.region], FAMILIES.index(p.family), MARKETS.index(p.market))
    )
    return {
        "source": source.name,
        "regions": [
            {"region": region, "available_vcpus": free_by_region.get(region, 0)} for region in order
        ],
        "pools": [pool.view() for pool in ordered],
        "project_tag_key": PROJECT_TAG_KEY,
    }
