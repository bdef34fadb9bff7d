"""Where replicas run. A provider starts and stops the processes or instances of a replica.

``external``: the user runs the replica anywhere with the token the API returned; nothing is
started or stopped here. ``ec2`` (``chalicelib/ec2_provider.py``) runs each replica on an EC2 GPU
instance. The local stack registers a ``local`` provider that runs each replica as an engine
process plus a sidecar process on this machine.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class CapacityUnavailable(Exception):
    """A launch failed for lack of capacity or quota; the next placement candidate may succeed.

    ``code`` is the provider's error code (EC2: ``InsufficientInstanceCapacity``,
    ``MaxSpotInstanceCountExceeded``, ``VcpuLimitExceeded``, ...).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class InstanceProfileNotReady(Exception):
    """A new IAM instance profile is not yet visible to EC2; the launch is retried later.

    IAM changes take seconds to reach EC2, so RunInstances right after CreateInstanceProfile can
    reject the profile. The launch state machine retries the task on this error.
    """


class Provider(Protocol):
    """Starts and stops the machines of replicas.

    ``launch`` starts one replica on the placement in ``config`` (``gpu_type``, ``tp_size``,
    ``pp_size``, ``instance_type``, ``region``, ``market``, ``max_model_len``, ``model_name``)
    and returns what it started (such as ``instance_id``), or None. It raises
    CapacityUnavailable when this placement has no capacity or quota. ``terminate`` stops every
    machine of the replica and does nothing when none runs.
    """

    name: str

    def launch(
        self, job_id: str, replica_id: str, token: str, config: dict[str, Any]
    ) -> dict[str, Any] | None: ...

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
    return sorted(set(_providers) | {"ec2"})


def get(name: str) -> Provider | None:
    if name == "ec2" and name not in _providers:
        # Created on first use, so processes that never launch on EC2 do not load it.
        from chalicelib.ec2_provider import EC2Provider

        register(EC2Provider.from_environment())
    return _providers.get(name)
