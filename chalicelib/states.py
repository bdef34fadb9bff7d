"""Job, chunk and replica state machines: the allowed transitions, written down once.

Every state change in DynamoDB is a conditional write whose condition comes from these tables,
so a change that is not listed here fails with a named error (a 409), never silently.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    VALIDATING = "validating"
    QUEUED = "queued"
    LAUNCHING = "launching"
    LOADING_MODEL = "loading_model"
    MODEL_READY = "model_ready"
    GENERATING = "generating"
    ASSEMBLING = "assembling"
    SUCCEEDED = "succeeded"
    COMPLETED_WITH_ERRORS = "completed_with_errors"
    FAILED = "failed"
    CANCELLED = "cancelled"


# A job's status only moves forward along this order; the terminal ones share the last rank.
JOB_STATUS_RANK: dict[JobStatus, int] = {
    JobStatus.VALIDATING: 0,
    JobStatus.QUEUED: 1,
    JobStatus.LAUNCHING: 2,
    JobStatus.LOADING_MODEL: 3,
    JobStatus.MODEL_READY: 4,
    JobStatus.GENERATING: 5,
    JobStatus.ASSEMBLING: 6,
    JobStatus.SUCCEEDED: 7,
    JobStatus.COMPLETED_WITH_ERRORS: 7,
    JobStatus.FAILED: 7,
    JobStatus.CANCELLED: 7,
}

JOB_TERMINAL = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.COMPLETED_WITH_ERRORS, JobStatus.FAILED, JobStatus.CANCELLED}
)

# Statuses in which replicas may still pull work.
JOB_ACCEPTS_WORK = frozenset(
    {
        JobStatus.QUEUED,
        JobStatus.LAUNCHING,
        JobStatus.LOADING_MODEL,
        JobStatus.MODEL_READY,
        JobStatus.GENERATING,
    }
)


def job_sources_for(target: JobStatus) -> list[JobStatus]:
    """Returns the statuses a job may move to ``target`` from."""
    if target == JobStatus.ASSEMBLING:
        return sorted(JOB_ACCEPTS_WORK, key=JOB_STATUS_RANK.__getitem__)
    if target in (JobStatus.SUCCEEDED, JobStatus.COMPLETED_WITH_ERRORS):
        return [JobStatus.ASSEMBLING]
    if target in (JobStatus.FAILED, JobStatus.CANCELLED):
        return [s for s in JobStatus if s not in JOB_TERMINAL]
    rank = JOB_STATUS_RANK[target]
    return [s for s in JOB_ACCEPTS_WORK | {JobStatus.VALIDATING} if JOB_STATUS_RANK[s] < rank]


class ChunkStatus(StrEnum):
    PENDING = "pending"
    INFLIGHT = "inflight"
    COMPLETED = "completed"
    FAILED = "failed"


# pending -> inflight on pull; inflight -> pending on reclaim or release; completion is accepted
# from any attempt that finished the work, so a reclaimed (pending) or budget-exhausted (failed)
# chunk can still become completed until the job is assembled.
CHUNK_TRANSITIONS: dict[ChunkStatus, frozenset[ChunkStatus]] = {
    ChunkStatus.PENDING: frozenset({ChunkStatus.INFLIGHT, ChunkStatus.COMPLETED}),
    ChunkStatus.INFLIGHT: frozenset(
        {ChunkStatus.PENDING, ChunkStatus.COMPLETED, ChunkStatus.FAILED}
    ),
    ChunkStatus.FAILED: frozenset({ChunkStatus.COMPLETED}),
    ChunkStatus.COMPLETED: frozenset(),
}


class ReplicaPhase(StrEnum):
    REGISTERED = "registered"
    LAUNCHING = "launching"
    LOADING_MODEL = "loading_model"
    MODEL_READY = "model_ready"
    RUNNING = "running"
    DRAINING = "draining"
    PREEMPTING = "preempting"
    COMPLETED = "completed"
    FAILED = "failed"
    DEAD = "dead"
    KILLED = "killed"
    SWAPPED_OUT = "swapped_out"


REPLICA_TERMINAL = frozenset(
    {ReplicaPhase.COMPLETED, ReplicaPhase.FAILED, ReplicaPhase.KILLED, ReplicaPhase.SWAPPED_OUT}
)

_STARTING = frozenset({ReplicaPhase.REGISTERED, ReplicaPhase.LAUNCHING, ReplicaPhase.LOADING_MODEL})
_ENDINGS = frozenset(
    {
        ReplicaPhase.COMPLETED,
        ReplicaPhase.FAILED,
        ReplicaPhase.DEAD,
        ReplicaPhase.KILLED,
        ReplicaPhase.SWAPPED_OUT,
        ReplicaPhase.DRAINING,
    }
)

REPLICA_TRANSITIONS: dict[ReplicaPhase, frozenset[ReplicaPhase]] = {
    ReplicaPhase.REGISTERED: frozenset(
        {ReplicaPhase.LAUNCHING, ReplicaPhase.LOADING_MODEL, ReplicaPhase.MODEL_READY}
        | {ReplicaPhase.RUNNING}
        | _ENDINGS
    ),
    # launching -> launching and loading_model -> launching: the launch state machine moves a
    # replica that did not come up to its next placement candidate.
    ReplicaPhase.LAUNCHING: frozenset(
        {ReplicaPhase.LAUNCHING, ReplicaPhase.LOADING_MODEL, ReplicaPhase.MODEL_READY}
        | {ReplicaPhase.RUNNING}
        | _ENDINGS
    ),
    ReplicaPhase.LOADING_MODEL: frozenset(
        {ReplicaPhase.LAUNCHING, ReplicaPhase.MODEL_READY, ReplicaPhase.RUNNING} | _ENDINGS
    ),
    ReplicaPhase.MODEL_READY: frozenset({ReplicaPhase.RUNNING, ReplicaPhase.PREEMPTING} | _ENDINGS),
    ReplicaPhase.RUNNING: frozenset({ReplicaPhase.PREEMPTING} | _ENDINGS),
    ReplicaPhase.DRAINING: frozenset(_ENDINGS - {ReplicaPhase.DRAINING}),
    ReplicaPhase.PREEMPTING: frozenset(_ENDINGS),
    # A replica marked dead for missed heartbeats may come back (a network partition healed).
    ReplicaPhase.DEAD: frozenset({ReplicaPhase.RUNNING} | (_ENDINGS - {ReplicaPhase.DEAD})),
    ReplicaPhase.COMPLETED: frozenset(),
    ReplicaPhase.FAILED: frozenset(),
    ReplicaPhase.KILLED: frozenset(),
    ReplicaPhase.SWAPPED_OUT: frozenset(),
}

# Phases in which a replica may lease new chunks.
REPLICA_MAY_PULL = _STARTING | {
    ReplicaPhase.MODEL_READY,
    ReplicaPhase.RUNNING,
    ReplicaPhase.DEAD,
}


def replica_sources_for(target: ReplicaPhase) -> list[ReplicaPhase]:
    return [p for p, targets in REPLICA_TRANSITIONS.items() if target in targets]
