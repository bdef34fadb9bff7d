"""Where replicas run. A provider starts and stops the processes or instances of a replica.

``external``: the user runs the replica anywhere with the token the API returned; nothing is
started or stopped here. The local stack registers a ``local`` provider that runs each replica as
an engine process plus a sidecar process on this machine.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class Provider(Protocol):
    name: str

    def launch(self, job_id: str, replica_id: str, token: str, config: dict[str, Any]) -> None: ...

    def terminate(self, job_id: str, replica_id: str) -> None: ...


class ExternalProvider:
    name = "external"

    def launch(self, job_id: str, replica_id: str, token: str, config: dict[str, Any]) -> None:
        return None

    def terminate(self, job_id: str, replica_id: str) -> None:
        return None


_providers: dict[str, Provider] = {"external": ExternalProvider()}


def register(provider: Provider) -> None:
    _providers[provider.name] = provider


def unregister(name: str) -> None:
    if name != "external":
        _providers.pop(name, None)


def default_name() -> str:
    """The provider a job's replicas use unless the request names one (``TANDEMN_PROVIDER``)."""
    return os.environ.get("TANDEMN_PROVIDER", "external")


def available() -> list[str]:
    return sorted(_providers)


def get(name: str) -> Provider | None:
    return _providers.get(name)
