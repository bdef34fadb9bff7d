"""boto3 clients, created once per process and per endpoint.

``AWS_ENDPOINT_URL`` (set by the local stage) sends every client to the moto server.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import boto3
from botocore.config import Config

_lock = threading.Lock()
_clients: dict[tuple[str, str | None, str], Any] = {}

# Standard retry mode retries throttling and 5xx with backoff; every retry is logged by
# botocore at DEBUG, and the caller logs the final error once.
_CONFIG = Config(
    retries={"mode": "standard", "max_attempts": 5}, connect_timeout=5, read_timeout=30
)


def client(service: str) -> Any:
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    key = (service, endpoint, region)
    with _lock:
        found = _clients.get(key)
        if found is None:
            found = boto3.session.Session().client(service, region_name=region, config=_CONFIG)
            _clients[key] = found
        return found


def regional_client(service: str, region: str) -> Any:
    """Returns a client of ``service`` in ``region``; quotas and prices are read per region."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    key = (service, endpoint, region)
    with _lock:
        found = _clients.get(key)
        if found is None:
            found = boto3.session.Session().client(service, region_name=region, config=_CONFIG)
            _clients[key] = found
        return found


def reset_clients() -> None:
    """Drops cached clients; tests call it when they start a fresh mock."""
    with _lock:
        _clients.clear()
