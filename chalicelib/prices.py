"""Hourly prices and regional availability of the catalog's instance types.

``AwsPriceSource`` reads spot prices from EC2 ``DescribeSpotPriceHistory``, on-demand prices
from the AWS Price List API and the instance types each region offers from
``DescribeInstanceTypeOfferings``. ``StaticPriceSource`` serves the catalog's us-east-1
on-demand prices and only the spot prices it is given. ``TANDEMN_PRICE_SOURCE`` selects one
("aws", the default, or "static").

A spot price is never derived from an on-demand price: without a known spot price the solver
drops the spot candidate.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib import aws, catalog
from chalicelib.quotas import SourceConfigError

logger = logging.getLogger(__name__)

PRICE_CACHE_SECONDS = 15 * 60.0
# The Price List API is served from us-east-1 (and a few other regions) for every region.
PRICE_LIST_REGION = "us-east-1"


@dataclass(frozen=True, slots=True)
class Price:
    usd_per_hour: float
    # spot_price_history, price_list_api, catalog_us_east_1 or static
    source: str
    # The Availability Zone of a spot price (the cheapest zone of the region).
    zone: str | None = None


@dataclass
class PriceBook:
    """Prices keyed by (region, instance type, market) and the types each region offers."""

    prices: dict[tuple[str, str, str], Price] = field(default_factory=dict)
    # region -> instance types offered there; a region missing here offers every type.
    offered: dict[str, set[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def price(self, region: str, instance_type: str, market: str) -> Price | None:
        return self.prices.get((region, instance_type, market))

    def is_offered(self, region: str, instance_type: str) -> bool:
        offered = self.offered.get(region)
        return offered is None or instance_type in offered


class PriceSource(Protocol):
    name: str

    def price_book(self, regions: Sequence[str], instance_types: Sequence[str]) -> PriceBook: ...


def _catalog_on_demand(book: PriceBook, regions: Sequence[str], types: Sequence[str]) -> None:
    """Fills on-demand prices missing from ``book`` with the catalog's us-east-1 price."""
    by_name = catalog.instance_by_name()
    for region in regions:
        for name in types:
            key = (region, name, "on_demand")
            price = by_name[name].on_demand_usd_per_hour
            if key not in book.prices and price is not None:
                book.prices[key] = Price(float(price), "catalog_us_east_1")


class StaticPriceSource:
    """The catalog's us-east-1 on-demand price in every region, and the given spot prices.

    ``spot`` and ``on_demand`` map region ("*" for any) to instance type to USD per hour;
    ``on_demand`` entries replace the catalog price. ``offered`` maps region to the instance
    types available there; a region not listed offers every type.
    """

    name = "static"

    def __init__(
        self,
        spot: dict[str, dict[str, float]] | None = None,
        on_demand: dict[str, dict[str, float]] | None = None,
        offered: dict[str, list[str]] | None = None,
    ) -> None:
        self._spot = _check_table(spot or {}, "spot")
        self._on_demand = _check_table(on_demand or {}, "on_demand")
        self._offered = {region: set(types) for region, types in (offered or {}).items()}

    def price_book(self, regions: Sequence[str], instance_types: Sequence[str]) -> PriceBook:
        book = PriceBook(offered={r: self._offered[r] for r in regions if r in self._offered})
        for market, table in (("spot", self._spot), ("on_demand", self._on_demand)):
            for region in regions:
                by_type = {**table.get("*", {}), **table.get(region, {})}
                for name in instance_types:
                    if name in by_type:
                        book.prices[(region, name, market)] = Price(by_type[name], "static")
        _catalog_on_demand(book, regions, instance_types)
        return book


def _check_table(table: Any, market: str) -> dict[str, dict[str, float]]:
    known = catalog.instance_by_name()
    if not isinstance(table, dict):
        raise SourceConfigError(f"static {market} prices must be a JSON object keyed by region")
    for region, prices in table.items():
        if not isinstance(prices, dict):
            raise SourceConfigError(f"static {market} prices for {region} must map types to USD")
        for name, value in prices.items():
            if name not in known:
                raise SourceConfigError(
                    f"static {market} prices for {region}: {name!r} is not in the instance catalog"
                )
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise SourceConfigError(
                    f"static {market} price of {name} in {region} must be a positive number of "
                    f"USD per hour, got {value!r}"
                )
    return {r: {n: float(v) for n, v in p.items()} for r, p in table.items()}


ClientFactory = Callable[[str, str], Any]


class AwsPriceSource:
    """Live prices: spot from DescribeSpotPriceHistory, on-demand from the Price List API.

    A spot price is the lowest current price over the region's Availability Zones, with that
    zone. On-demand prices the Price List API does not return fall back to the catalog's
    us-east-1 price, marked ``catalog_us_east_1``.
    """

    name = "aws"

    def __init__(self, client_factory: ClientFactory | None = None) -> None:
        self._client = client_factory or aws.regional_client

    def price_book(self, regions: Sequence[str], instance_types: Sequence[str]) -> PriceBook:
        book = PriceBook()
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(regions)))) as pool:
            results = list(pool.map(lambda r: self._region(r, instance_types), regions))
        for region, (prices, offered, errors) in zip(regions, results, strict=True):
            book.prices.update(prices)
            if offered is not None:
                book.offered[region] = offered
            book.errors.extend(errors)
        _catalog_on_demand(book, regions, instance_types)
        return book

    def _region(
        self, region: str, types: Sequence[str]
    ) -> tuple[dict[tuple[str, str, str], Price], set[str] | None, list[str]]:
        prices: dict[tuple[str, str, str], Price] = {}
        errors: list[str] = []
        offered: set[str] | None = None
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("spot prices", lambda: prices.update(self._spot(region, types))),
            ("on-demand prices", lambda: prices.update(self._on_demand(region, types))),
        ]
        for part, step in steps:
            try:
                step()
            except (ClientError, BotoCoreError) as error:
                logger.warning(
                    "price read failed", extra={"region": region, "part": part, "error": str(error)}
                )
                errors.append(f"{region}: {part} unreadable: {error}")
        try:
            offered = self._offered(region, types)
        except (ClientError, BotoCoreError) as error:
            logger.warning("offerings read failed", extra={"region": region, "error": str(error)})
            errors.append(f"{region}: instance type offerings unreadable: {error}")
        return prices, offered, errors

    def _spot(self, region: str, types: Sequence[str]) -> dict[tuple[str, str, str], Price]:
        client = self._client("ec2", region)
        paginator = client.get_paginator("describe_spot_price_history")
        best: dict[str, Price] = {}
        pages = paginator.paginate(
            InstanceTypes=list(types),
            ProductDescriptions=["Linux/UNIX"],
            StartTime=datetime.datetime.now(datetime.UTC),
        )
        for page in pages:
            for entry in page.get("SpotPriceHistory", []):
                name = entry["InstanceType"]
                price = Price(
                    float(entry["SpotPrice"]), "spot_price_history", entry.get("AvailabilityZone")
                )
                if name not in best or price.usd_per_hour < best[name].usd_per_hour:
                    best[name] = price
        return {(region, name, "spot"): price for name, price in best.items()}

    def _on_demand(self, region: str, types: Sequence[str]) -> dict[tuple[str, str, str], Price]:
        client = self._client("pricing", PRICE_LIST_REGION)
        requested_types = set(types)
        filters = [
            {"Type": "TERM_MATCH", "Field": field_name, "Value": value}
            for field_name, value in (
                ("regionCode", region),
                ("instanceFamily", "GPU instance"),
                ("operatingSystem", "Linux"),
                ("tenancy", "Shared"),
                ("preInstalledSw", "NA"),
                ("capacitystatus", "Used"),
                ("licenseModel", "No License required"),
            )
        ]
        result: dict[tuple[str, str, str], Price] = {}
        paginator = client.get_paginator("get_products")
        for page in paginator.paginate(ServiceCode="AmazonEC2", Filters=filters):
            for raw in page.get("PriceList", []):
                product = json.loads(raw) if isinstance(raw, str) else raw
                name = product.get("product", {}).get("attributes", {}).get("instanceType")
                if name not in requested_types:
                    continue
                usd = _on_demand_usd(product)
                if usd is not None and usd > 0:
                    result[(region, name, "on_demand")] = Price(usd, "price_list_api")
        return result

    def _offered(self, region: str, types: Sequence[str]) -> set[str]:
        client = self._client("ec2", region)
        paginator = client.get_paginator("describe_instance_type_offerings")
        offered: set[str] = set()
        pages = paginator.paginate(
            LocationType="region", Filters=[{"Name": "instance-type", "Values": list(types)}]
        )
        for page in pages:
            for entry in page.get("InstanceTypeOfferings", []):
                offered.add(entry["InstanceType"])
        return offered


def _on_demand_usd(product: dict[str, Any]) -> float | None:
    """Returns the hourly USD price of a Price List product's on-demand term, if it has one."""
    for term in product.get("terms", {}).get("OnDemand", {}).values():
        for dimension in term.get("priceDimensions", {}).values():
            if dimension.get("unit") not in (None, "Hrs"):
                continue
            usd = dimension.get("pricePerUnit", {}).get("USD")
            if usd is not None:
                return float(usd)
    return None


class _CachedPriceSource:
    def __init__(self, inner: PriceSource, seconds: float) -> None:
        self.inner = inner
        self.name = inner.name
        self._seconds = seconds
        self._lock = threading.Lock()
        self._cache: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[float, PriceBook]] = {}

    def price_book(self, regions: Sequence[str], instance_types: Sequence[str]) -> PriceBook:
        key = (tuple(regions), tuple(instance_types))
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None and cached[0] >= now:
            return cached[1]
        book = self.inner.price_book(regions, instance_types)
        with self._lock:
            self._cache[key] = (now + self._seconds, book)
        return book


_lock = threading.Lock()
_aws_source: _CachedPriceSource | None = None


def _json_env(name: str) -> Any:
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError as error:
        raise SourceConfigError(f"{name} is not valid JSON: {error}") from error


def source_from_env() -> PriceSource:
    """Returns the price source ``TANDEMN_PRICE_SOURCE`` selects ("aws" by default).

    The static source reads ``TANDEMN_SPOT_PRICES``, ``TANDEMN_ON_DEMAND_PRICES`` and
    ``TANDEMN_OFFERINGS`` (JSON, all optional) on every call.
    """
    global _aws_source
    kind = os.environ.get("TANDEMN_PRICE_SOURCE", "aws")
    if kind == "static":
        return StaticPriceSource(
            spot=_json_env("TANDEMN_SPOT_PRICES"),
            on_demand=_json_env("TANDEMN_ON_DEMAND_PRICES"),
            offered=_json_env("TANDEMN_OFFERINGS"),
        )
    if kind != "aws":
        raise SourceConfigError(f"TANDEMN_PRICE_SOURCE {kind!r} is not known; use aws or static")
    with _lock:
        if _aws_source is None:
            _aws_source = _CachedPriceSource(AwsPriceSource(), PRICE_CACHE_SECONDS)
        return _aws_source
