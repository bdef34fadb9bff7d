"""``tandemn web``: opens the web dashboard in a browser, with a dashboard token where the stage
needs one. ``register(app)`` adds the command to the ``tandemn`` command.

A deployed stage's ``POST /dashboard/token`` is IAM-authorised, so the command signs it with
SigV4 (the ``execute-api`` service) using the AWS credentials boto3 finds. The local stack
listens on 127.0.0.1 and needs no token.
"""

from __future__ import annotations

import json
import os
import re
import webbrowser
from typing import Any
from urllib.parse import urlparse

import httpx
import typer

from tandemn.api_client import ApiError, _error_message, default_api_url
from tandemn.cli_common import _fail, console, valid_id

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
# https://<api id>.execute-api.<region>.amazonaws.com/<stage>
EXECUTE_API_HOST = re.compile(r"^[a-z0-9]+\.execute-api\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?$")


def needs_token(api_url: str) -> bool:
    """Returns False for an API on this machine (the local stage), True for any other host."""
    return (urlparse(api_url).hostname or "") not in LOOPBACK_HOSTS


def _region_of(api_url: str) -> str:
    match = EXECUTE_API_HOST.match(urlparse(api_url).hostname or "")
    if match:
        return match.group(1)
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def signed_headers(url: str, body: bytes, region: str) -> dict[str, str]:
    """Returns the headers of a SigV4-signed POST of ``body`` to ``url``."""
    import boto3
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest

    credentials = boto3.session.Session().get_credentials()
    if credentials is None:
        raise ApiError(
            "no AWS credentials found to sign POST /dashboard/token; configure them (aws "
            "configure, AWS_PROFILE or AWS_ACCESS_KEY_ID) or open the local stack's dashboard"
        )
    request = AWSRequest(
        method="POST", url=url, data=body, headers={"Content-Type": "application/json"}
    )
    SigV4Auth(credentials.get_frozen_credentials(), "execute-api", region).add_auth(request)
    return dict(request.headers.items())


def mint_token(api_url: str, ttl_seconds: int, http: httpx.Client | None = None) -> dict[str, Any]:
    """Calls ``POST /dashboard/token``, SigV4-signed, and returns its JSON."""
    url = api_url.rstrip("/") + "/dashboard/token"
    body = json.dumps({"ttl_seconds": ttl_seconds}).encode()
    headers = signed_headers(url, body, _region_of(api_url))
    client = http or httpx.Client(timeout=30.0)
    try:
        response = client.post(url, content=body, headers=headers)
    except httpx.HTTPError as error:
        raise ApiError(f"cannot reach the control plane at {api_url} ({error})") from error
    finally:
        if http is None:
            client.close()
    if response.status_code >= 400:
        message, body_data = _error_message(response)
        raise ApiError(message, response.status_code, body_data)
    return response.json()


def dashboard_url(api_url: str, token: str | None = None, job_id: str | None = None) -> str:
    """Builds the page's URL: the token in the query (the page route checks it), the job in
    the fragment."""
    url = api_url.rstrip("/") + "/dashboard"
    if token:
        url += f"?token={token}"
    if job_id:
        url += f"#job={job_id}"
    return url


def web(
    job_id: str | None = typer.Argument(
        None, callback=valid_id, help="Job to show first (default: the newest active)."
    ),
    print_only: bool = typer.Option(
        False, "--print", help="Print the dashboard URL instead of opening a browser."
    ),
    ttl: int = typer.Option(
        3600,
        "--ttl",
        min=60,
        max=12 * 3600,
        help="Seconds the dashboard token stays valid (deployed stages only).",
    ),
    api_url: str | None = typer.Option(
        None,
        "--api-url",
        help="Control-plane URL (default: $TANDEMN_API_URL, else the running `tandemn local up` "
        "stack, else http://127.0.0.1:26336).",
    ),
) -> None:
    """Open the web dashboard: jobs, replicas, cost, quotas, events and live charts."""
    api_url = api_url or default_api_url()
    token = None
    if needs_token(api_url):
        try:
            issued = mint_token(api_url, ttl)
        except ApiError as error:
            _fail(str(error))
        token = issued["token"]
    url = dashboard_url(api_url, token, job_id)
    if print_only:
        # soft_wrap keeps the URL on one line, so it can be copied whole.
        console.print(url, soft_wrap=True, highlight=False, markup=False)
        return
    if not webbrowser.open(url):
        console.print("no browser could be opened; open this URL:", highlight=False)
        console.print(url, soft_wrap=True, highlight=False, markup=False)
        return
    console.print(f"opened the dashboard of {api_url}", highlight=False)


def register(app: typer.Typer) -> None:
    """Adds ``web`` to the ``tandemn`` command."""
    app.command()(web)
