"""Wire contract: pydantic v2 models of the request and response bodies of every route.

Field names follow the Tandemn System API so that its users find the same payloads.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

# Job and replica ids appear in S3 keys and URL paths, so they are limited to a safe alphabet.
ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,79}$"
ID_RE = re.compile(ID_PATTERN)
S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]/[^\x00-\x1f]{1,1024}$"

ResourceId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
ChunkId = Annotated[str, StringConstraints(pattern=r"^c[0-9]{6}$")]
LeaseToken = Annotated[
    str, StringConstraints(min_length=16, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
]


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class SubmitBatchRequest(RequestModel):
    model_name: str = Field(min_length=1, max_length=200)
    input_file: str = Field(
        pattern=S3_URI_PATTERN, description="s3://bucket/key of the JSONL input"
    )
    slo_deadline_hours: float = Field(default=4.0, gt=0, le=720)
    placement_solver: Literal["roofline", "user_specified"] | None = None
    gpu_type: str | None = Field(default=None, min_length=1, max_length=32)
    tp_size: Literal[1, 2, 4, 8] | None = None
    pp_size: Literal[1, 2, 3, 4] | None = None
    replicas: int | None = Field(default=None, ge=1, le=1024)
    chunk_size: int = Field(default=1000, ge=1, le=100_000, description="requests per chunk")
    max_output_tokens: int | None = Field(default=None, ge=1, le=1_048_576)
    avg_output_tokens: int | None = Field(default=None, ge=1, le=1_048_576)
    on_demand: bool = False
    persist: bool = False
    force: bool = False
    description: str | None = Field(default=None, max_length=2000)
    user_id: str | None = Field(default=None, max_length=128)

    @field_validator("placement_solver", mode="before")
    @classmethod
    def _reject_llm_solver(cls, value: Any) -> Any:
        if value == "llm":
            raise ValueError("the 'llm' solver is not offered; use 'roofline' or 'user_specified'")
        return value


class SubmitBatchResponse(BaseModel):
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
    provider: Literal["external", "local"] | None = Field(
        default=None, description="where the replicas run; default: the stage's provider"
    )
    gpu_type: str | None = Field(default=None, max_length=32)
    tp_size: Literal[1, 2, 4, 8] | None = None
    pp_size: Literal[1, 2, 3, 4] | None = None
    on_demand: bool | None = None
    force: bool = False


class Progress(BaseModel):
    total: int
    pending: int
    inflight: int
    completed: int
    failed: int
    all_done: bool


class KillRequest(RequestModel):
    replica_ids: list[ResourceId] = Field(min_length=1, max_length=1024)


class UploadRequest(RequestModel):
    filename: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._-]+$")
    size_bytes: int | None = Field(default=None, ge=1, le=2 * 1024**3)
