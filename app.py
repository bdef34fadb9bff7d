"""Chalice entry point: wires routes, scheduled handlers and Lambda tasks to ``chalicelib``."""

from __future__ import annotations

import os

from aws_lambda_powertools import Logger
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from chalice import Chalice, IAMAuthorizer, Rate

# assembly and submission register the background tasks "assemble" and "validate" on import.
from chalicelib import (
    assembly,  # noqa: F401
    background,
    chunks,
    jobs,
    providers,
    replicas,
    storage,
    submission,
    watchdog,
)
from chalicelib.config import load_settings
from chalicelib.http import handle_errors, json_response, parse_body, path_id, query_int
from chalicelib.models import (
    ChunkCompleteRequest,
    ChunkLeaseRequest,
    ChunkPullRequest,
    ChunkReleaseRequest,
    KillRequest,
    PhaseRequest,
    ScaleRequest,
    SubmitBatchRequest,
    UploadRequest,
)
from chalicelib.states import JobStatus, ReplicaPhase

# The service name differs from app_name so Chalice and Powertools do not both print each line.
logger = Logger(service=os.environ.get("POWERTOOLS_SERVICE_NAME", "tandemn-control-plane"))
copy_config_to_registered_loggers(source_logger=logger, include={"chalicelib"})

app = Chalice(app_name="tandemn", configure_logs=False)
# User routes are signed with the caller's AWS credentials (SigV4) in a deployed stage; the local
# stage listens on 127.0.0.1 only and Chalice's local server admits IAM routes unchecked.
# Replica routes carry no API Gateway authorizer: they check the replica's bearer token.
iam = IAMAuthorizer()

JSON = ["application/json"]


def _body(model):
    return parse_body(model, app.current_request.raw_body)


def _replica(job_id: str):
    settings = load_settings()
    headers = app.current_request.headers or {}
    return replicas.authenticate(settings, job_id, headers.get("authorization"))


@app.route("/submit/batch", methods=["POST"], content_types=JSON, authorizer=iam)
@handle_errors
def submit_batch():
    request = _body(SubmitBatchRequest)
    return json_response(submission.submit(load_settings(), request))


@app.route("/uploads", methods=["POST"], content_types=JSON, authorizer=iam)
@handle_errors
def create_upload():
    request = _body(UploadRequest)
    return json_response(storage.presigned_upload(load_settings(), request.filename))


@app.route("/job/{job_id}/output", methods=["GET"], authorizer=iam)
@handle_errors
def job_output(job_id):
    settings = load_settings()
    job = jobs.get_job(settings, path_id(job_id, "job_id"))
    return json_response(storage.output_links(settings, job))


@app.route("/jobs", methods=["GET"], authorizer=iam)
@handle_errors
def list_jobs():
    params = app.current_request.query_params or {}
    limit = query_int(params, "limit", 50, 1, jobs.MAX_LIST_LIMIT)
    return json_response(jobs.list_jobs(load_settings(), limit, params.get("next_token")))


@app.route("/job/{job_id}", methods=["GET"], authorizer=iam)
@handle_errors
def get_job(job_id):
    settings = load_settings()
    job = jobs.get_job(settings, path_id(job_id, "job_id"))
    return json_response(jobs.job_view(settings, job))


@app.route("/job/{job_id}/phase", methods=["POST"], content_types=JSON)
@handle_errors
def report_phase(job_id):
    job_id = path_id(job_id, "job_id")
    replica = _replica(job_id)
    request = _body(PhaseRequest)
    replicas.require_same_replica(replica, request.replica_id)
    settings = load_settings()
    target = {
        "loading_model": ReplicaPhase.LOADING_MODEL,
        "model_ready": ReplicaPhase.MODEL_READY,
        "generating": ReplicaPhase.RUNNING,
        "draining": ReplicaPhase.DRAINING,
        "replica_complete": ReplicaPhase.COMPLETED,
        "startup_failed": ReplicaPhase.FAILED,
    }[request.phase]
    previous = replicas.transition_replica(
        settings, job_id, request.replica_id, target, reason=request.reason
    )
    job_target = {
        "loading_model": JobStatus.LOADING_MODEL,
        "model_ready": JobStatus.MODEL_READY,
        "generating": JobStatus.GENERATING,
    }.get(request.phase)
    if job_target is not None:
        jobs.transition_job(settings, job_id, job_target, strict=False)
    # A draining replica keeps its leases to finish them and releases the rest itself; a replica
    # that completed or failed holds nothing it will finish, so its leases return at once.
    if target in (ReplicaPhase.COMPLETED, ReplicaPhase.FAILED):
        chunks.reclaim_owned_by(settings, job_id, request.replica_id)
    job = jobs.get_job(settings, job_id)
    return json_response(
        {
            "ok": True,
            "replica_phase": target.value,
            "previous_phase": previous,
            "job_status": job["status"],
        }
    )


@app.route("/job/{job_id}/chunks/pull", methods=["POST"], content_types=JSON)
@handle_errors
def pull_chunk(job_id):
    job_id = path_id(job_id, "job_id")
    replica = _replica(job_id)
    request = _body(ChunkPullRequest)
    replicas.require_same_replica(replica, request.replica_id)
    settings = load_settings()
    lease = chunks.pull(settings, job_id, replica)
    if lease is None:
        return json_response("", 204)
    return json_response(chunks.lease_response(settings, lease))


@app.route("/job/{job_id}/chunks/renew", methods=["POST"], content_types=JSON)
@handle_errors
def renew_chunk(job_id):
    job_id = path_id(job_id, "job_id")
    replica = _replica(job_id)
    request = _body(ChunkLeaseRequest)
    replicas.require_same_replica(replica, request.replica_id)
    expires = chunks.renew(
        load_settings(), job_id, request.replica_id, request.chunk_id, request.lease_token
    )
    return json_response(
        {
            "renewed": True,
            "chunk_id": request.chunk_id,
            "lease_expires_at": expires,
            "lease_until": expires,
        }
    )


@app.route("/job/{job_id}/chunks/release", methods=["POST"], content_types=JSON)
@handle_errors
def release_chunk(job_id):
    job_id = path_id(job_id, "job_id")
    replica = _replica(job_id)
    request = _body(ChunkReleaseRequest)
    replicas.require_same_replica(replica, request.replica_id)
    settings = load_settings()
    status = chunks.release(
        settings,
        job_id,
        request.replica_id,
        request.chunk_id,
        request.lease_token,
        reason=request.reason,
        error_message=request.error,
    )
    job = jobs.get_job(settings, job_id)
    progress = jobs.progress_of(job)
    if progress["all_done"]:
        background.submit("assemble", {"job_id": job_id})
    return json_response(
        {
            "released": True,
            "chunk_id": request.chunk_id,
            "chunk_status": status,
            "progress": progress,
        }
    )


@app.route("/job/{job_id}/chunks/complete", methods=["POST"], content_types=JSON)
@handle_errors
def complete_chunk(job_id):
    job_id = path_id(job_id, "job_id")
    replica = _replica(job_id)
    request = _body(ChunkCompleteRequest)
    replicas.require_same_replica(replica, request.replica_id)
    settings = load_settings()
    result = chunks.complete(
        settings,
        job_id,
        request.replica_id,
        request.chunk_id,
        request.lease_token,
        output_key=request.output_key,
        object_exists=lambda key: storage.object_exists(settings.bucket, key),
        counts=request.model_dump(
            include={"requests_succeeded", "requests_failed", "prompt_tokens", "generation_tokens"}
        ),
    )
    if result.status == "completed" and result.progress["all_done"]:
        background.submit("assemble", {"job_id": job_id})
    return json_response({"status": result.status, "chunk_id": request.chunk_id, **result.progress})


@app.route("/job/{job_id}/chunks/progress", methods=["GET"])
@handle_errors
def chunk_progress(job_id):
    job_id = path_id(job_id, "job_id")
    _replica(job_id)
    job = jobs.get_job(load_settings(), job_id)
    return json_response({**jobs.progress_of(job), "job_status": job["status"]})


@app.route("/job/{job_id}/scale", methods=["POST"], content_types=JSON, authorizer=iam)
@handle_errors
def scale_job(job_id):
    job_id = path_id(job_id, "job_id")
    request = _body(ScaleRequest)
    settings = load_settings()
    config = {
        "gpu_type": request.gpu_type,
        "tp_size": request.tp_size,
        "pp_size": request.pp_size,
        "market": None
        if request.on_demand is None
        else ("on_demand" if request.on_demand else "spot"),
    }
    provider = request.provider or providers.default_name()
    registered = replicas.register_replicas(
        settings, job_id, request.count, provider=provider, config=config
    )
    return json_response(
        {
            "status": "scaling",
            "provider": provider,
            "version": registered["version"],
            "new_replicas": [r["replica_id"] for r in registered["replicas"]],
            "replica_tokens": {r["replica_id"]: r["token"] for r in registered["replicas"]},
            "message": "replica tokens are shown only once; start each replica with its token",
        }
    )


@app.route("/job/{job_id}/kill", methods=["POST"], content_types=JSON, authorizer=iam)
@handle_errors
def kill_job_replicas(job_id):
    job_id = path_id(job_id, "job_id")
    request = _body(KillRequest)
    return json_response(replicas.kill_replicas(load_settings(), job_id, request.replica_ids))


@app.route("/job/{job_id}/replicas", methods=["GET"], authorizer=iam)
@handle_errors
def list_job_replicas(job_id):
    job_id = path_id(job_id, "job_id")
    settings = load_settings()
    jobs.get_job(settings, job_id)
    fields = (
        "replica_id",
        "phase",
        "provider",
        "region",
        "market",
        "instance_type",
        "gpu_type",
        "tp_size",
        "pp_size",
        "version",
        "last_heartbeat",
        "phase_reason",
        "created_at",
    )
    items = [{k: r.get(k) for k in fields} for r in replicas.list_replicas(settings, job_id)]
    return json_response({"job_id": job_id, "replicas": items})


@app.schedule(Rate(1, unit=Rate.MINUTES), name="watchdog")
def run_watchdog(event):
    return watchdog.run_once(load_settings())


@app.lambda_function(name="run_background_task")
def run_background_task(event, context):
    name = event.get("task")
    payload = event.get("payload") or {}
    logger.info("background task started", task=name, **payload)
    background.run(name, payload)
    return {"ok": True}
