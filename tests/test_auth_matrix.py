"""Authorization matrix: every route of app.py's route table against four credentials.

The credentials: none, the replica token of another job, the token of another replica of the
same job, and the right one. Replica routes check the bearer token in the app, so every cell is
a request. User routes are checked by API Gateway's IAM authorizer in a deployed stage, and
Chalice's local server and test client do not run it. So their cells are facts of the route
table: the route carries the authorizer, and the view never reads a replica token. A bearer
replica token is not a SigV4 signature, so API Gateway rejects it. Dashboard routes check a
dashboard token in the app. ROUTE_KINDS must name every route, so a new route without a
decision fails here.
"""

from __future__ import annotations

import pytest
from chalice import IAMAuthorizer

from chalicelib import openapi
from tests import support

USER = "user"  # IAM (SigV4), enforced by API Gateway
REPLICA = "replica"  # the bearer token of the replica named in the body
REPLICA_OF_JOB = "replica of the job"  # the bearer token of any replica of the job in the path
DASHBOARD = "dashboard"  # a dashboard token (tdb_...), required outside the local stage
PUBLIC = "public"  # no credentials

ROUTE_KINDS = {
    ("POST", "/submit/batch"): USER,
    ("POST", "/uploads"): USER,
    ("GET", "/jobs"): USER,
    ("GET", "/job/{job_id}"): USER,
    ("GET", "/job/{job_id}/output"): USER,
    ("POST", "/job/{job_id}/scale"): USER,
    ("POST", "/job/{job_id}/kill"): USER,
    ("POST", "/job/{job_id}/swap"): USER,
    ("POST", "/job/{job_id}/cancel"): USER,
    ("GET", "/job/{job_id}/replicas"): USER,
    ("GET", "/job/{job_id}/metrics"): USER,
    ("GET", "/job/{job_id}/metrics/stream"): USER,
    ("GET", "/job/{job_id}/throughput"): USER,
    ("GET", "/job/{job_id}/replicas/{replica_id}/metrics"): USER,
    ("GET", "/job/{job_id}/replicas/summaries"): USER,
    ("GET", "/job/{job_id}/events"): USER,
    ("GET", "/analytics/runs"): USER,
    ("GET", "/analytics/runs/{run_id}"): USER,
    ("GET", "/analytics/runs/{run_id}/timeseries"): USER,
    ("POST", "/ws/token"): USER,
    ("POST", "/test/placement"): USER,
    ("GET", "/resources"): USER,
    ("GET", "/quota/status"): USER,
    ("POST", "/dashboard/token"): USER,
    ("POST", "/job/{job_id}/phase"): REPLICA,
    ("POST", "/job/{job_id}/heartbeat"): REPLICA,
    ("POST", "/job/{job_id}/chunks/pull"): REPLICA,
    ("POST", "/job/{job_id}/chunks/renew"): REPLICA,
    ("POST", "/job/{job_id}/chunks/release"): REPLICA,
    ("POST", "/job/{job_id}/chunks/complete"): REPLICA,
    ("POST", "/job/{job_id}/metrics/ingest"): REPLICA,
    ("POST", "/job/{job_id}/metrics/summary"): REPLICA,
    ("GET", "/job/{job_id}/chunks/progress"): REPLICA_OF_JOB,
    ("GET", "/dashboard"): DASHBOARD,
    ("GET", "/dashboard/poll"): DASHBOARD,
    ("GET", "/dashboard/stream"): DASHBOARD,
    ("POST", "/dashboard/ws-token"): DASHBOARD,
    ("GET", "/openapi.json"): PUBLIC,
}

LEASE = {"chunk_id": "c000000", "lease_token": "x" * 20}
# A valid body for each replica route, for the replica the body names.
REPLICA_BODIES = {
    "/job/{job_id}/phase": {"phase": "loading_model"},
    "/job/{job_id}/heartbeat": {},
    "/job/{job_id}/chunks/pull": {},
    "/job/{job_id}/chunks/renew": LEASE,
    "/job/{job_id}/chunks/release": LEASE,
    "/job/{job_id}/chunks/complete": LEASE,
    "/job/{job_id}/metrics/ingest": {"session": "s1", "snapshots": []},
    "/job/{job_id}/metrics/summary": {"metrics": {"requests": 1}},
}


def route_table():
    from app import app

    return {
        (method, path): entry
        for path, methods in app.routes.items()
        for method, entry in methods.items()
    }


def routes_of(kind: str) -> list[tuple[str, str]]:
    return sorted(route for route, route_kind in ROUTE_KINDS.items() if route_kind == kind)


def test_every_route_has_an_auth_decision():
    routes = set(route_table())
    assert routes - set(ROUTE_KINDS) == set(), "add the new routes to ROUTE_KINDS"
    assert set(ROUTE_KINDS) - routes == set(), "remove routes that app.py no longer has"


@pytest.mark.parametrize("route", routes_of(USER))
def test_user_route_carries_iam_authorizer(route):
    entry = route_table()[route]
    assert isinstance(entry.authorizer, IAMAuthorizer)


@pytest.mark.parametrize("route", routes_of(USER))
def test_user_route_never_reads_replica_token(route):
    facts = openapi.inspect_view(route_table()[route].view_function)
    assert not facts.replica_token
    assert not facts.dashboard_token


@pytest.mark.parametrize("route", routes_of(REPLICA) + routes_of(REPLICA_OF_JOB))
def test_replica_route_checks_token_not_iam(route):
    entry = route_table()[route]
    assert entry.authorizer is None
    assert openapi.inspect_view(entry.view_function).replica_token


@pytest.mark.parametrize("route", routes_of(DASHBOARD) + routes_of(PUBLIC))
def test_browser_route_has_no_iam_authorizer(route):
    assert route_table()[route].authorizer is None


@pytest.mark.parametrize("route", routes_of(DASHBOARD))
def test_dashboard_route_checks_dashboard_token(route):
    assert openapi.inspect_view(route_table()[route].view_function).dashboard_token


@pytest.fixture
def two_jobs(client, aws_account):
    """Job A with two external replicas and job B with one; returns their ids and tokens."""
    job_a = support.submit_job(client, aws_account, num_requests=4, chunk_size=2)["job_id"]
    tokens_a = support.add_replicas(client, job_a, 2)
    job_b = support.submit_job(client, aws_account, num_requests=2, chunk_size=2)["job_id"]
    tokens_b = support.add_replicas(client, job_b, 1)
    (right, right_token), (_, sibling_token) = sorted(tokens_a.items())
    return {
        "job": job_a,
        "replica": right,
        "right": right_token,
        "same job, other replica": sibling_token,
        "other job": next(iter(tokens_b.values())),
    }


def call(client, method: str, path: str, body: dict | None, token: str | None):
    if method == "GET":
        return support.get(client, path, token)
    return support.post(client, path, body, token)


@pytest.mark.parametrize("route", routes_of(REPLICA))
def test_replica_route_accepts_only_its_replica(client, two_jobs, route):
    method, template = route
    assert template in REPLICA_BODIES, f"give {template} a valid body in REPLICA_BODIES"
    path = template.format(job_id=two_jobs["job"])
    body = {"replica_id": two_jobs["replica"], **REPLICA_BODIES[template]}

    missing = call(client, method, path, body, None)
    assert missing.status_code == 401, missing.body
    other_job = call(client, method, path, body, two_jobs["other job"])
    assert other_job.status_code == 403, other_job.body
    sibling = call(client, method, path, body, two_jobs["same job, other replica"])
    assert sibling.status_code == 403, sibling.body
    assert "does not match" in sibling.json_body["message"]
    right = call(client, method, path, body, two_jobs["right"])
    assert right.status_code not in (401, 403), right.body
    assert right.status_code < 500, right.body


@pytest.mark.parametrize("route", routes_of(REPLICA_OF_JOB))
def test_progress_accepts_any_replica_of_job(client, two_jobs, route):
    method, template = route
    path = template.format(job_id=two_jobs["job"])
    assert call(client, method, path, None, None).status_code == 401
    assert call(client, method, path, None, two_jobs["other job"]).status_code == 403
    assert call(client, method, path, None, two_jobs["same job, other replica"]).status_code == 200
    assert call(client, method, path, None, two_jobs["right"]).status_code == 200


def test_forged_token_for_real_replica_is_401(client, two_jobs):
    forged = f"trk_{two_jobs['replica']}.not-the-secret"
    path = f"/job/{two_jobs['job']}/chunks/pull"
    response = support.post(client, path, {"replica_id": two_jobs["replica"]}, forged)
    assert response.status_code == 401


@pytest.mark.parametrize("route", routes_of(DASHBOARD))
def test_dashboard_route_accepts_only_dashboard_token(client, two_jobs, route):
    method, path = route
    for name in ("other job", "same job, other replica", "right"):
        response = call(client, method, path, {}, two_jobs[name])
        assert response.status_code == 401, (name, response.body)
    assert call(client, method, path, {}, None).status_code == 401
    issued = support.post(client, "/dashboard/token", {})
    assert issued.status_code == 200, issued.body
    response = call(client, method, path, {}, issued.json_body["token"])
    assert response.status_code == 200, response.body


@pytest.mark.parametrize("route", routes_of(PUBLIC))
def test_public_route_needs_no_credentials(client, aws_account, route):
    method, path = route
    assert call(client, method, path, None, None).status_code == 200
