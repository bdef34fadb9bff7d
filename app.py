"""Chalice entry point: wires routes, scheduled handlers and Lambda tasks to ``chalicelib``."""

from __future__ import annotations

import json
import os

import boto3
from aws_lambda_powertools import Logger
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from chalice import Chalice, IAMAuthorizer, Rate, Response

# assembly and submission register the background tasks "assemble" and "validate" on import;
# swap and teardown register their state machine tasks with lifecycle on import.
from chalicelib import (
    analytics,
    assembly,  # noqa: F401
    background,
    cancel,
    chunks,
    cost,
    dashboard,
    events,
    jobs,
    lifecycle,
    live,
    metrics_store,
    observability,
    placement,
    providers,
    quotas,
    replicas,
    spot,
    storage,
    submission,
    swap,
    teardown,
    watchdog,
)
from chalicelib.config import load_settings
from chalicelib.errors import ControlPlaneError, NotFound
from chalicelib.http import (
    handle_errors,
    json_response,
    parse_body,
    path_id,
    query_float,
    query_int,
)
from chalicelib.models import (
    CancelRequest,
    ChunkCompleteRequest,
    ChunkLeaseRequest,
    ChunkPullRequest,
    ChunkReleaseRequest,
    DashboardTokenRequest,
    HeartbeatRequest,
    KillRequest,
    MetricsIngestRequest,
    MetricsSummaryRequest,
    PhaseRequest,
    PlacementRequest,
    ScaleRequest,
    SubmitBatchRequest,
    SwapRequest,
    UploadRequest,
)
from chalicelib.states import JOB_TERMINAL, JobStatus, ReplicaPhase

# The service name differs from app_name so Chalice and Powertools do not both print each line.
logger = Logger(service=os.environ.get("POWERTOOLS_SERVICE_NAME", "tandemn-control-plane"))
copy_config_to_registered_loggers(source_logger=logger, include={"chalicelib"})

app = Chalice(app_name="tandemn", configure_logs=False)
app.experimental_feature_flags.update(["WEBSOCKETS"])
# The WebSocket handlers and push_metrics send through API Gateway's management API with it.
app.websocket_api.session = boto3.session.Session()
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
    submitted = submission.submit(load_settings(), request)
    observability.count(observability.JOBS_SUBMITTED)
    return json_response(submitted)


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
    view = jobs.job_view(settings, job)
    view["cost"] = cost.cost_of_job(settings, job)
    view["warnings"] = jobs.job_warnings(view)
    return json_response(view)


@app.route("/job/{job_id}/phase", methods=["POST"], content_types=JSON)
@handle_errors
def report_phase(job_id):
    job_id = path_id(job_id, "job_id")
    replica = _replica(job_id)
    request = _body(PhaseRequest)
    replicas.require_same_replica(replica, request.replica_id)
    settings = load_settings()
    # A replica that fails to start under a launch execution moves to its next placement
    # candidate instead of ending failed.
    if request.phase == "startup_failed" and lifecycle.on_startup_failed(
        settings, job_id, request.replica_id, request.reason or ""
    ):
        current = replicas.get_replica(settings, job_id, request.replica_id) or {}
        job = jobs.get_job(settings, job_id)
        return json_response(
            {
                "ok": True,
                "replica_phase": current.get("phase"),
                "previous_phase": current.get("phase"),
                "job_status": job["status"],
            }
        )
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
    if target in (ReplicaPhase.MODEL_READY, ReplicaPhase.RUNNING):
        # Ends the launch execution's wait for this replica, if one waits.
        lifecycle.on_ready(settings, job_id, request.replica_id)
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
        teardown.start_teardown(settings, job_id)
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
    if result.status == "completed":
        observability.count(observability.CHUNKS_COMPLETED)
    if result.status == "completed" and result.progress["all_done"]:
        teardown.start_teardown(settings, job_id)
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
    if provider != "external":
        # The scale state machine launches these replicas; their tokens never leave AWS.
        overrides = {"gpu_type": request.gpu_type, "tp_size": request.tp_size}
        overrides["pp_size"] = request.pp_size
        scaled = lifecycle.scale(
            settings,
            job_id,
            request.count,
            provider=provider,
            overrides=overrides,
            on_demand=request.on_demand,
            force=request.force,
        )
        return json_response(scaled)
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


@app.route("/job/{job_id}/swap", methods=["POST"], content_types=JSON, authorizer=iam)
@handle_errors
def swap_job_replicas(job_id):
    job_id = path_id(job_id, "job_id")
    request = _body(SwapRequest)
    settings = load_settings()
    if request.cancel:
        return json_response(swap.request_cancel(settings, job_id))
    return json_response(
        swap.start_swap(
            settings,
            job_id,
            overrides={
                "gpu_type": request.gpu_type,
                "tp_size": request.tp_size,
                "pp_size": request.pp_size,
            },
            num_replicas=request.num_replicas,
            ready_threshold=request.ready_threshold,
            on_demand=request.on_demand,
            force=request.force,
        )
    )


@app.route("/job/{job_id}/heartbeat", methods=["POST"], content_types=JSON)
@handle_errors
def replica_heartbeat(job_id):
    job_id = path_id(job_id, "job_id")
    replica = _replica(job_id)
    request = _body(HeartbeatRequest)
    replicas.require_same_replica(replica, request.replica_id)
    return json_response(lifecycle.record_heartbeat(load_settings(), job_id, request.replica_id))


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
    reporting = metrics_store.replicas_with_metrics(settings, job_id)
    for item in items:
        item["has_metrics"] = item["replica_id"] in reporting
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


@app.lambda_function(name="lifecycle_task")
def lifecycle_task(event, context):
    # Runs every task of the launch, scale, swap and teardown state machines. The class name of
    # a raised error is the error name that the state machines catch.
    return lifecycle.run_task(event)


@app.lambda_function(name="spot_interruption")
def spot_interruption(event, context):
    # Target of the EventBridge rule for "EC2 Spot Instance Interruption Warning".
    return spot.handle_interruption(load_settings(), event)


# Metrics, live updates, events and run analytics.


@app.middleware("all")
def flush_control_plane_metrics(event, get_response):
    # Every handler's counts leave as one CloudWatch EMF line when the handler returns.
    try:
        return get_response(event)
    finally:
        observability.flush()


@app.route("/job/{job_id}/metrics/ingest", methods=["POST"], content_types=JSON)
@handle_errors
def ingest_metrics(job_id):
    job_id = path_id(job_id, "job_id")
    replica = _replica(job_id)
    request = _body(MetricsIngestRequest)
    replicas.require_same_replica(replica, request.replica_id)
    return json_response(metrics_store.ingest(load_settings(), job_id, request))


@app.route("/job/{job_id}/metrics/summary", methods=["POST"], content_types=JSON)
@handle_errors
def post_metrics_summary(job_id):
    job_id = path_id(job_id, "job_id")
    replica = _replica(job_id)
    request = _body(MetricsSummaryRequest)
    replicas.require_same_replica(replica, request.replica_id)
    settings = load_settings()
    metrics_store.put_summary(settings, job_id, request.replica_id, request.metrics)
    # A summary that arrives after assembly wrote the run report is added to the report.
    if jobs.get_job(settings, job_id)["status"] in {s.value for s in JOB_TERMINAL}:
        analytics.write_run_report_safely(settings, job_id)
    return json_response({"ok": True})


@app.route("/job/{job_id}/metrics", methods=["GET"], authorizer=iam)
@handle_errors
def job_metrics(job_id):
    return json_response(metrics_store.job_metrics(load_settings(), path_id(job_id, "job_id")))


@app.route("/job/{job_id}/metrics/stream", methods=["GET"], authorizer=iam)
@handle_errors
def job_metrics_stream(job_id):
    job_id = path_id(job_id, "job_id")
    settings = load_settings()
    job = jobs.get_job(settings, job_id)
    try:
        snapshot = metrics_store.job_metrics(settings, job_id)
    except NotFound:
        snapshot = None
    return Response(
        body=live.sse_body(job_id, job["status"], snapshot),
        status_code=200,
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
    )


@app.route("/job/{job_id}/throughput", methods=["GET"], authorizer=iam)
@handle_errors
def job_throughput(job_id):
    params = app.current_request.query_params or {}
    window = query_int(params, "window", 60, 1, 24 * 3600)
    return json_response(
        metrics_store.throughput(load_settings(), path_id(job_id, "job_id"), window)
    )


@app.route("/job/{job_id}/replicas/{replica_id}/metrics", methods=["GET"], authorizer=iam)
@handle_errors
def replica_metrics(job_id, replica_id):
    return json_response(
        metrics_store.replica_metrics(
            load_settings(), path_id(job_id, "job_id"), path_id(replica_id, "replica_id")
        )
    )


@app.route("/job/{job_id}/replicas/summaries", methods=["GET"], authorizer=iam)
@handle_errors
def replica_summaries(job_id):
    job_id = path_id(job_id, "job_id")
    settings = load_settings()
    jobs.get_job(settings, job_id)
    summaries = metrics_store.list_summaries(settings, job_id)
    return json_response({"job_id": job_id, "count": len(summaries), "summaries": summaries})


@app.route("/job/{job_id}/events", methods=["GET"], authorizer=iam)
@handle_errors
def job_events(job_id):
    params = app.current_request.query_params or {}
    return json_response(
        events.list_events(
            load_settings(),
            path_id(job_id, "job_id"),
            limit=query_int(params, "limit", 100, 1, events.MAX_LIST_LIMIT),
            next_token=params.get("next_token"),
            since=query_float(params, "since"),
        )
    )


@app.route("/analytics/runs", methods=["GET"], authorizer=iam)
@handle_errors
def list_runs():
    params = app.current_request.query_params or {}
    return json_response(
        analytics.list_runs(
            load_settings(),
            model=params.get("model"),
            gpu=params.get("gpu"),
            limit=query_int(params, "limit", 50, 1, analytics.MAX_LIST_LIMIT),
            next_token=params.get("next_token"),
        )
    )


@app.route("/analytics/runs/{run_id}", methods=["GET"], authorizer=iam)
@handle_errors
def get_run(run_id):
    run = analytics.get_run(load_settings(), path_id(run_id, "run_id"))
    return json_response({"status": "success", "run": run})


@app.route("/analytics/runs/{run_id}/timeseries", methods=["GET"], authorizer=iam)
@handle_errors
def run_timeseries(run_id):
    run_id = path_id(run_id, "run_id")
    settings = load_settings()
    analytics.get_run(settings, run_id)
    params = app.current_request.query_params or {}
    replica_id = params.get("replica")
    return json_response(
        metrics_store.timeseries(
            settings,
            run_id,
            start=query_float(params, "start"),
            end=query_float(params, "end"),
            step=query_float(params, "step", 1.0, 3600.0) or 5.0,
            replica_id=path_id(replica_id, "replica") if replica_id else None,
            limit=query_int(params, "limit", 2000, 1, metrics_store.MAX_SERIES_LIMIT),
            next_token=params.get("next_token"),
        )
    )


@app.route("/ws/token", methods=["POST"], authorizer=iam)
@handle_errors
def websocket_token():
    return json_response(live.issue_connect_token(load_settings()))


@app.on_ws_connect()
def websocket_connect(event):
    token = (event.to_dict().get("queryStringParameters") or {}).get("token")
    context = event.to_dict()["requestContext"]
    accepted = live.accept_connection(
        load_settings(), event.connection_id, context["apiId"], event.stage, token
    )
    if not accepted:
        return Response(body="a valid connect token from POST /ws/token is required", status_code=401)
    return None


@app.on_ws_message()
def websocket_message(event):
    settings = load_settings()
    try:
        message = json.loads(event.body)
        action, job_id = message.get("action"), path_id(str(message.get("job_id")), "job_id")
    except (ValueError, AttributeError, ControlPlaneError):
        app.websocket_api.send(
            event.connection_id,
            json.dumps(
                {
                    "type": "error",
                    "message": 'send {"action": "subscribe", "job_id": "<job id>"} or the same '
                    'with "unsubscribe"',
                }
            ),
        )
        return
    api_id = event.to_dict()["requestContext"]["apiId"]
    if action == "unsubscribe":
        live.unsubscribe(settings, event.connection_id, job_id)
        return
    live.subscribe(settings, event.connection_id, job_id, api_id, event.stage)
    try:
        snapshot = metrics_store.job_metrics(settings, job_id)
    except NotFound:
        snapshot = None
    if snapshot is not None:
        app.websocket_api.send(event.connection_id, live.metrics_message(job_id, snapshot))


@app.on_ws_disconnect()
def websocket_disconnect(event):
    live.disconnect(load_settings(), event.connection_id)


# Chalice needs the stream ARN when app.py is imported; a deployed stage sets it to the stack
# output MetricsStreamArn. The default names no existing stream, so nothing subscribes to it.
@app.on_dynamodb_record(
    stream_arn=os.environ.get(
        "TANDEMN_METRICS_STREAM_ARN",
        "arn:aws:dynamodb:us-east-1:123456789012:table/tandemn-metrics/stream/"
        "1970-01-01T00:00:00.000",
    ),
    batch_size=100,
    name="push_metrics",
)
def push_metrics(event):
    return live.push_metrics(load_settings(), app.websocket_api, live.jobs_in_stream(event))


# Placement: the solver alone, the instance catalog and the EC2 vCPU quotas.
@app.route("/test/placement", methods=["POST"], content_types=JSON, authorizer=iam)
@handle_errors
def test_placement():
    request = _body(PlacementRequest)
    return json_response(placement.placement_for_request(load_settings(), request))


@app.route("/resources", methods=["GET"], authorizer=iam)
@handle_errors
def list_resources():
    return json_response(placement.resources_view())


@app.route("/quota/status", methods=["GET"], authorizer=iam)
@handle_errors
def quota_status():
    return json_response(quotas.status_view(quotas.source_from_env(), quotas.regions_from_env()))


# Job cancellation: the job ends `cancelled` and its replicas stop (chalicelib/cancel.py).
@app.route("/job/{job_id}/cancel", methods=["POST"], content_types=JSON, authorizer=iam)
@handle_errors
def cancel_job(job_id):
    job_id = path_id(job_id, "job_id")
    request = _body(CancelRequest)
    return json_response(cancel.cancel_job(load_settings(), job_id, reason=request.reason))


# The OpenAPI document of this API (chalicelib/openapi.py). It is served without credentials:
# it contains only the route table and the request schemas, the same text as docs/openapi.json
# in the repository, and no job data.
@app.route("/openapi.json", methods=["GET"])
@handle_errors
def openapi_document():
    # Imported here, so cold starts of the other routes do not load the generator.
    from chalicelib import openapi

    return json_response(openapi.cached_document(app))


# The web dashboard (chalicelib/dashboard.py): the page, its payload by polling and by
# server-sent events, and its tokens. Browsers cannot sign SigV4, so these routes carry no IAM
# authorizer. Outside the local stage each checks a dashboard token that the IAM-signed
# POST /dashboard/token issues.
def _dashboard_settings():
    settings = load_settings()
    request = app.current_request
    dashboard.authorize(settings, request.headers, request.query_params)
    return settings


@app.route("/dashboard", methods=["GET"])
@handle_errors
def dashboard_page():
    html, headers = dashboard.page(_dashboard_settings())
    return Response(body=html, status_code=200, headers=headers)


def _dashboard_payload(since_value):
    settings = _dashboard_settings()
    params = app.current_request.query_params or {}
    return dashboard.build_payload(
        settings, selected=params.get("job") or None, since=dashboard.parse_since(since_value)
    )


@app.route("/dashboard/poll", methods=["GET"])
@handle_errors
def dashboard_poll():
    params = app.current_request.query_params or {}
    payload = _dashboard_payload(params.get("since"))
    return Response(
        body=dashboard.encode(payload),
        status_code=200,
        headers={"Content-Type": "application/json", "Cache-Control": "no-store"},
    )


@app.route("/dashboard/stream", methods=["GET"])
@handle_errors
def dashboard_stream():
    # An EventSource that reconnects sends the id of the last event it received.
    headers = app.current_request.headers or {}
    params = app.current_request.query_params or {}
    payload = _dashboard_payload(headers.get("last-event-id") or params.get("since"))
    return Response(
        body=dashboard.sse_body(payload),
        status_code=200,
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
    )


@app.route("/dashboard/token", methods=["POST"], content_types=JSON, authorizer=iam)
@handle_errors
def dashboard_token():
    request = _body(DashboardTokenRequest)
    identity = (app.current_request.context or {}).get("identity") or {}
    return json_response(
        dashboard.issue_token(load_settings(), request.ttl_seconds, identity.get("userArn"))
    )


@app.route("/dashboard/ws-token", methods=["POST"], content_types=JSON)
@handle_errors
def dashboard_websocket_token():
    # The page cannot call the IAM-signed POST /ws/token, so it presents its dashboard token.
    return json_response(live.issue_connect_token(_dashboard_settings()))
