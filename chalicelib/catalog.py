"""GPU instance and model catalogs, read from ``chalicelib/data/*.json``.

The JSON files are data with a source for every figure (see their ``sources`` and ``source``
fields, and docs/placement.md). Chalice packages everything under ``chalicelib/``, so the files
travel with the Lambda code.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Any

from chalicelib.errors import InvalidRequest

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
GIB = 1024**3


@dataclass(frozen=True, slots=True)
class GpuSpec:
    name: str
    memory_gib: float
    memory_bandwidth_gb_per_s: float
    bf16_dense_tflops: float
    # "NVLink" or "PCIe": the link tensor-parallel all-reduces use inside one instance.
    interconnect: str
    # Per direction, GB/s, nominal.
    interconnect_gb_per_s: float
    sources: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class InstanceType:
    instance_type: str
    gpu: GpuSpec
    gpu_count: int
    vcpus: int
    # Baseline network bandwidth in Gbit/s; pipeline stages on different instances use it.
    network_gbps: float
    # Service Quotas family: "G" (G and VT instances) or "P" (P4, P5 and P6 share it).
    quota_family: str
    # us-east-1 Linux on-demand price; None when no on-demand price is known.
    on_demand_usd_per_hour: float | None
    price_source: str

    @property
    def gpu_type(self) -> str:
        return self.gpu.name

    def view(self, sources: dict[str, str]) -> dict[str, Any]:
        return {
            "instance_type": self.instance_type,
            "gpu_type": self.gpu.name,
            "gpu_count": self.gpu_count,
            "gpu_memory_gib": self.gpu.memory_gib,
            "memory_bandwidth_gb_per_s": self.gpu.memory_bandwidth_gb_per_s,
            "bf16_dense_tflops": self.gpu.bf16_dense_tflops,
            "interconnect": self.gpu.interconnect,
            "interconnect_gb_per_s": self.gpu.interconnect_gb_per_s,
            "vcpus": self.vcpus,
            "network_gbps": self.network_gbps,
            "quota_family": self.quota_family,
            "on_demand_usd_per_hour_us_east_1": self.on_demand_usd_per_hour,
            "price_source": sources.get(self.price_source, self.price_source),
            "spec_sources": [sources.get(key, key) for key in ("aws_specs", *self.gpu.sources)],
        }


@dataclass(frozen=True, slots=True)
class ModelArchitecture:
    """A decoder-only transformer, described with the field names of Hugging Face config.json."""

    name: str
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    num_parameters: float
    # Parameters used per token; equal to num_parameters for a dense model.
    active_parameters: float
    # MLP width of a dense model, or of one expert of a mixture-of-experts model.
    intermediate_size: int
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    # "catalog" or "request": where the architecture came from.
    origin: str = "catalog"

    @property
    def is_moe(self) -> bool:
        return self.active_parameters < self.num_parameters

    def expert_parameters(self) -> float:
        """Returns the parameters of all experts together (0 for a dense model).

        With E experts of which k run per token, active = shared + experts * k / E and
        total = shared + experts, so experts = (total - active) / (1 - k / E).
        """
        if not self.is_moe:
            return 0.0
        if not self.num_experts or not self.num_experts_per_tok:
            # Unknown routing: treat every parameter as read on every step (an upper bound).
            return 0.0
        routed_fraction = self.num_experts_per_tok / self.num_experts
        if routed_fraction >= 1:
            return 0.0
        return (self.num_parameters - self.active_parameters) / (1 - routed_fraction)

    def view(self) -> dict[str, Any]:
        view = {
            "name": self.name,
            "origin": self.origin,
            "num_hidden_layers": self.num_hidden_layers,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "num_parameters": self.num_parameters,
            "active_parameters": self.active_parameters,
            "intermediate_size": self.intermediate_size,
        }
        if self.num_experts:
            view["num_experts"] = self.num_experts
            view["num_experts_per_tok"] = self.num_experts_per_tok
        return view


def _read(name: str) -> Any:
    with open(os.path.join(DATA_DIR, name), encoding="utf-8") as handle:
        return json.load(handle)


@functools.cache
def instance_catalog() -> tuple[dict[str, str], tuple[InstanceType, ...]]:
    """Returns the price and spec sources and the instance types, in file order."""
    data = _read("instances.json")
    gpus = {
        name: GpuSpec(
            name=name,
            memory_gib=float(spec["memory_gib"]),
            memory_bandwidth_gb_per_s=float(spec["memory_bandwidth_gb_per_s"]),
            bf16_dense_tflops=float(spec["bf16_dense_tflops"]),
            interconnect=spec["interconnect"],
            interconnect_gb_per_s=float(spec["interconnect_gb_per_s"]),
            sources=tuple(spec["sources"]),
        )
        for name, spec in data["gpus"].items()
    }
    instances = tuple(
        InstanceType(
            instance_type=entry["instance_type"],
            gpu=gpus[entry["gpu_type"]],
            gpu_count=int(entry["gpu_count"]),
            vcpus=int(entry["vcpus"]),
            network_gbps=float(entry["network_gbps"]),
            quota_family=entry["quota_family"],
            on_demand_usd_per_hour=entry["on_demand_usd_per_hour"],
            price_source=entry["price_source"],
        )
        for entry in data["instances"]
    )
    return dict(data["sources"]), instances


def instance_types() -> tuple[InstanceType, ...]:
    return instance_catalog()[1]


def instance_by_name() -> dict[str, InstanceType]:
    return {instance.instance_type: instance for instance in instance_types()}


def gpu_types() -> list[str]:
    return sorted({instance.gpu_type for instance in instance_types()})


def match_gpu_type(requested: str) -> set[str]:
    """Returns the catalog GPU types a requested ``gpu_type`` names, case-insensitively.

    "A100" names both A100 sizes; "a100-80gb" and "A100_80GB" name one. Raises InvalidRequest
    naming the known types when nothing matches.
    """
    normalised = requested.strip().upper().replace("_", "-")
    known = gpu_types()
    exact = {name for name in known if name.upper() == normalised}
    if exact:
        return exact
    prefixed = {name for name in known if name.upper().startswith(normalised + "-")}
    if prefixed:
        return prefixed
    raise InvalidRequest(
        f"gpu_type {requested!r} is not in the instance catalog; use one of: {', '.join(known)}",
        field="gpu_type",
    )


def _architecture(entry: dict[str, Any], name: str, origin: str) -> ModelArchitecture:
    heads = int(entry["num_attention_heads"])
    hidden = int(entry["hidden_size"])
    total = float(entry["num_parameters"])
    return ModelArchitecture(
        name=name,
        num_hidden_layers=int(entry["num_hidden_layers"]),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=int(entry.get("num_key_value_heads") or heads),
        head_dim=int(entry.get("head_dim") or hidden // heads),
        vocab_size=int(entry["vocab_size"]),
        max_position_embeddings=int(entry["max_position_embeddings"]),
        num_parameters=total,
        active_parameters=float(entry.get("active_parameters") or total),
        # 4 x hidden is the width of the original transformer MLP; it only sizes activations.
        intermediate_size=int(entry.get("intermediate_size") or 4 * hidden),
        num_experts=entry.get("num_experts"),
        num_experts_per_tok=entry.get("num_experts_per_tok"),
        origin=origin,
    )


@functools.cache
def model_catalog() -> dict[str, ModelArchitecture]:
    """Returns the catalog's architectures keyed by lowercased Hugging Face id and alias."""
    by_key: dict[str, ModelArchitecture] = {}
    for entry in _read("models.json")["models"]:
        architecture = _architecture(entry, entry["id"], "catalog")
        for key in (entry["id"], *entry.get("aliases", ())):
            by_key[key.lower()] = architecture
    return by_key


def model_ids() -> list[str]:
    return sorted({architecture.name for architecture in model_catalog().values()})


def find_model(model_name: str) -> ModelArchitecture | None:
    """Looks a model up by Hugging Face id or alias, case-insensitively.

    A name without an organisation ("Llama-3.1-8B-Instruct") matches when exactly one catalog
    entry has that last part.
    """
    key = model_name.strip().lower()
    catalog = model_catalog()
    if key in catalog:
        return catalog[key]
    if "/" not in key:
        matches = {arch.name: arch for k, arch in catalog.items() if k.split("/", 1)[-1] == key}
        if len(matches) == 1:
            return next(iter(matches.values()))
    return None


def architecture_from_request(model_name: str, spec: dict[str, Any]) -> ModelArchitecture:
    return _architecture(spec, model_name, "request")


def resolve_model(model_name: str, spec: dict[str, Any] | None) -> ModelArchitecture:
    """Returns the architecture to plan with: the request's ``model_architecture`` if given,
    otherwise the catalog entry. Raises InvalidRequest for an unknown model without one.
    """
    if spec is not None:
        return architecture_from_request(model_name, spec)
    found = find_model(model_name)
    if found is not None:
        return found
    raise InvalidRequest(unknown_model_message(model_name), field="model_name")


def unknown_model_message(model_name: str) -> str:
    return (
        f"model {model_name!r} is not in the model catalog, so its memory and speed cannot be "
        "estimated; pass its architecture as model_architecture, with the config.json fields "
        "num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads, vocab_size, "
        "max_position_embeddings and the total parameter count num_parameters (plus "
        "active_parameters, num_experts and num_experts_per_tok for a mixture of experts), or "
        "use a catalog model (GET /resources lists them)"
    )
