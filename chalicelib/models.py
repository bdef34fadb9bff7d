"""Wire contract: pydantic v2 models of the request and response bodies of every route.

Field names follow the Tandemn System API so that its users find the same payloads.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

# Job and replica ids appear in S3 keys and URL paths, so they are limited to a safe alphabet.
ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,79}$"
ID_RE = re.compile(ID_PATTERN)
S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]/[^\x00-\x1f]{1,1024}$"

ResourceId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
ChunkId = Annotated[str, StringConstraints(pattern=r"^c[0-9]{6}$")]
LeaseToken = Annotated[
    str, StringConstraints(min_length=16, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
]


def _reject_boolean(value: Any) -> Any:
    # A Literal of integers matches true as 1, even in strict mode, so booleans are rejected here.
    if isinstance(value, bool):
        raise PydanticCustomError("int_type", "Input should be an integer, not a boolean")
    return value


TensorParallelSize = Annotated[Literal[1, 2, 4, 8], BeforeValidator(_reject_boolean)]
PipelineParallelSize = Annotated[Literal[1, 2, 3, 4], BeforeValidator(_reject_boolean)]


class RequestModel(BaseModel):
    # defer_build: pydantic builds a model's validator on its first use, not at import, so a
    # Lambda cold start builds only the models of the route it serves (bench/cold_start.py).
    # strict: a JSON string is never converted to a number, so "2" for replicas is rejected.
    # Only true and false are booleans ("yes" for force is rejected). Integers are valid floats.
    model_config = ConfigDict(
        extra="forbid", str_strip_whitespace=True, defer_build=True, strict=True
    )


class ModelArchitectureSpec(RequestModel):
    """The architecture of a model outside the catalog, with Hugging Face config.json names.

    ``num_parameters`` (and ``active_parameters`` for a mixture of experts) are counts of
    parameters, such as 7.6e9. They come from the model card, because config.json lacks them.
    """

    num_hidden_layers: int = Field(ge=1, le=1000)
    hidden_size: int = Field(ge=1, le=1_000_000)
    num_attention_heads: int = Field(ge=1, le=10_000)
    num_key_value_heads: int | None = Field(default=None, ge=1, le=10_000)
    head_dim: int | None = Field(default=None, ge=1, le=16_384)
    vocab_size: int = Field(ge=1, le=10_000_000)
    max_position_embeddings: int = Field(ge=1, le=100_000_000)
    num_parameters: float = Field(gt=0, le=1e14)
    active_parameters: float | None = Field(default=None, gt=0, le=1e14)
    intermediate_size: int | None = Field(default=None, ge=1, le=10_000_000)
    num_experts: int | None = Field(default=None, ge=1, le=100_000)
    num_experts_per_tok: int | None = Field(default=None, ge=1, le=100_000)

    @model_validator(mode="after")
    def _check_consistency(self) -> ModelArchitectureSpec:
        kv_heads = self.num_key_value_heads or self.num_attention_heads
        if self.num_attention_heads % kv_heads:
            raise ValueError(
                f"num_key_value_heads {kv_heads} must divide num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.active_parameters is not None and self.active_parameters > self.num_parameters:
            raise ValueError("active_parameters cannot exceed num_parameters")
        if (self.num_experts is None) != (self.num_experts_per_tok is None):
            raise ValueError("give num_experts and num_experts_per_tok together")
        if self.num_experts is not None and self.num_experts_per_tok > self.num_experts:
            raise ValueError("num_experts_per_tok cannot exceed num_experts")
        return self


class SubmitBatchRequest(RequestModel):
    model_name: str = Field(min_length=1, max_length=200)
    input_file: str = Field(
        pattern=S3_URI_PATTERN, description="s3://bucket/key of the JSONL input"
    )
    slo_deadline_hours: float = Field(default=4.0, gt=0, le=720)
    placement_solver: Literal["roofline", "user_specified"] | None = None
    gpu_type: str | None = Field(default=None, min_length=1, max_length=32)
    tp_size: TensorParallelSize | None = None
    pp_size: PipelineParallelSize | None = None
    replicas: int | None = Field(default=None, ge=1, le=1024)
    chunk_size: int = Field(default=1000, ge=1, le=100_000, description="requests per chunk")
    max_output_tokens: int | None = Field(default=None, ge=1, le=1_048_576)
    avg_output_tokens: int | None = Field(default=None, ge=1, le=1_048_576)
    on_demand: bool = False
    persist: bool = False
    force: bool = False
    description: str | None = Field(default=None, max_length=2000)
    user_id: str | None = Field(default=None, max_length=128)
    model_architecture: ModelArchitectureSpec | None = Field(
        default=None, description="architecture of a model outside the catalog (for placement)"
    )

    @field_validator("placement_solver", mode="before")
    @classmethod
    def _reject_llm_solver(cls, value: Any) -> Any:
        if value == "llm":
            raise ValueError("the 'llm' solver is not offered; use 'roofline' or 'user_specified'")
        return value


class SubmitBatchResponse(BaseModel):
    # Built on first use, like the request models; the OpenAPI document is its only user.
    model_config = ConfigDict(defer_build=True)

    status: Literal["queued", "validating"]
    job_id: str
    chunks: int
    input_stats: dict[str, Any]
    output_location: str
    message: str


class ChunkPullRequest(RequestModel):
    replica_id: ResourceId


class ChunkLeaseRequest(RequestModel):
    replica_id: ResourceId
    chunk_id: ChunkId
    lease_token: LeaseToken


class ChunkCompleteRequest(ChunkLeaseRequest):
    output_key: str | None = Field(
        default=None,
        max_length=1024,
        description="S3 key the attempt wrote; must be the output_key handed out with the lease",
    )
    requests_succeeded: int = Field(default=0, ge=0, le=1_000_000)
    requests_failed: int = Field(default=0, ge=0, le=1_000_000)
    prompt_tokens: int = Field(default=0, ge=0, le=10**12)
    generation_tokens: int = Field(default=0, ge=0, le=10**12)


class ChunkReleaseRequest(ChunkLeaseRequest):
    reason: Literal["drain", "shutdown", "error"] = "drain"
    error: str | None = Field(default=None, max_length=2000)


class PhaseRequest(RequestModel):
    phase: Literal[
        "loading_model",
        "model_ready",
        "generating",
        "draining",
        "replica_complete",
        "startup_failed",
    ]
    replica_id: ResourceId
    reason: str | None = Field(default=None, max_length=2000)


class ScaleRequest(RequestModel):
    count: int = Field(ge=1, le=256)
    provider: Literal["external", "local", "ec2"] | None = Field(
        default=None, description="where the replicas run; default: the stage's provider"
    )
    gpu_type: str | None = Field(default=None, max_length=32)
    tp_size: TensorParallelSize | None = None
    pp_size: PipelineParallelSize | None = None
    on_demand: bool | None = None
    force: bool = False


class Progress(BaseModel):
    # Built on first use, like the request models.
    model_config = ConfigDict(defer_build=True)

    total: int
    pending: int
    inflight: int
    completed: int
    failed: int
    all_done: bool


class KillRequest(RequestModel):
    replica_ids: list[ResourceId] = Field(min_length=1, max_length=1024)


class SwapRequest(RequestModel):
    gpu_type: str | None = Field(default=None, max_length=32)
    tp_size: TensorParallelSize | None = None
    pp_size: PipelineParallelSize | None = None
    num_replicas: int | None = Field(
        default=None, ge=1, le=256, description="new replicas; default: as many as run now"
    )
    ready_threshold: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="new replicas that must complete a chunk before the old ones drain; "
        "default: num_replicas",
    )
    on_demand: bool | None = None
    force: bool = False
    cancel: bool = Field(default=False, description="abort the swap in progress")


class HeartbeatRequest(RequestModel):
    replica_id: ResourceId


class UploadRequest(RequestModel):
    filename: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._-]+$")
    size_bytes: int | None = Field(default=None, ge=1, le=2 * 1024**3)


# Metrics sent by replica sidecars. Counters and histograms are deltas since the sidecar's
# previous snapshot; gauges are the current values. Names are canonical (chalicelib/snapshots.py).
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
MetricName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,64}$")]
BucketBound = Annotated[str, StringConstraints(pattern=r"^(\+Inf|[0-9.eE+-]{1,24})$")]


class HistogramDelta(RequestModel):
    buckets: dict[BucketBound, NonNegativeFloat] = Field(
        max_length=64, description="upper bound (le) -> cumulative count added since last time"
    )
    sum: NonNegativeFloat = 0.0
    count: NonNegativeFloat = 0.0


class MetricSnapshot(RequestModel):
    seq: int = Field(ge=0, description="increases by one per snapshot of a sidecar session")
    timestamp: FiniteFloat = Field(gt=0, description="Unix seconds on the replica's clock")
    interval_s: NonNegativeFloat | None = None
    mode: Literal["engine", "client"] = Field(
        default="engine",
        description="client: latencies and tokens measured by the sidecar from streamed responses",
    )
    engine: str | None = Field(default=None, max_length=32)
    counters: dict[MetricName, NonNegativeFloat] = Field(default_factory=dict, max_length=32)
    gauges: dict[MetricName, NonNegativeFloat] = Field(default_factory=dict, max_length=32)
    histograms: dict[MetricName, HistogramDelta] = Field(default_factory=dict, max_length=16)
    gpu_sm_util_pct: NonNegativeFloat | None = None
    gpu_mem_bw_util_pct: NonNegativeFloat | None = None
    per_gpu: dict[
        Annotated[
            str, StringConstraints(pattern=r"^gpu[0-9]{1,2}_(sm_pct|membw_pct|mem_gb|mem_pct)$")
        ],
        NonNegativeFloat,
    ] = Field(default_factory=dict, max_length=64)


class MetricsIngestRequest(RequestModel):
    replica_id: ResourceId
    session: str = Field(
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="random id of the sidecar process; snapshots are deduplicated per session",
    )
    # A TransactWriteItems call holds at most 100 items: 50 timeseries rows plus the state.
    snapshots: list[MetricSnapshot] = Field(default_factory=list, max_length=50)
    dropped_snapshots: int = Field(default=0, ge=0, le=10**9)


class MetricsSummaryRequest(RequestModel):
    replica_id: ResourceId
    metrics: dict[str, Any] = Field(min_length=1, max_length=500)


class PlacementRequest(RequestModel):
    """Body of ``POST /test/placement``: the solver alone, with input statistics from
    ``input_file`` or given directly."""

    model_name: str = Field(min_length=1, max_length=200)
    slo_deadline_hours: float = Field(default=4.0, gt=0, le=720)
    input_file: str | None = Field(
        default=None, pattern=S3_URI_PATTERN, description="s3://bucket/key of a JSONL input"
    )
    num_lines: int | None = Field(default=None, ge=1, le=100_000_000)
    avg_input_tokens: float | None = Field(default=None, gt=0, le=10_000_000)
    max_input_tokens: int | None = Field(default=None, ge=1, le=10_000_000)
    avg_output_tokens: float | None = Field(default=None, gt=0, le=1_048_576)
    max_output_tokens: int | None = Field(default=None, ge=1, le=1_048_576)
    placement_solver: Literal["roofline", "user_specified"] | None = None
    gpu_type: str | None = Field(default=None, min_length=1, max_length=32)
    tp_size: TensorParallelSize | None = None
    pp_size: PipelineParallelSize | None = None
    on_demand: bool | None = Field(
        default=None, description="true: on-demand only; false or absent: spot and on-demand"
    )
    model_architecture: ModelArchitectureSpec | None = None
    limit: int = Field(default=50, ge=1, le=1000, description="placements to return")

    @field_validator("placement_solver", mode="before")
    @classmethod
    def _reject_llm_solver(cls, value: Any) -> Any:
        if value == "llm":
            raise ValueError("the 'llm' solver is not offered; use 'roofline' or 'user_specified'")
        return value


class CancelRequest(RequestModel):
    """Body of ``POST /job/{id}/cancel``; an empty body is accepted."""

    reason: str | None = Field(
        default=None, max_length=500, description="why the job was cancelled, stored on the job"
    )


class DashboardTokenRequest(RequestModel):
    """Body of ``POST /dashboard/token``; an empty body is accepted."""

    ttl_seconds: int = Field(
        default=3600, ge=60, le=12 * 3600, description="seconds the dashboard token stays valid"
    )
