"""The replica's lifeline to the control plane: heartbeats, spot notices, the token at boot.

- ``Heartbeat`` posts ``/job/{id}/heartbeat`` every ``interval`` seconds from start-up on. The
  control plane marks a replica whose heartbeat is older than 90 s dead and extends the launch
  wait of a starting replica on each one. It returns ``action: drain`` when the replica was
  swapped out, preempted or stopped, and the sidecar then drains.
- ``SpotNoticePoller`` reads the instance metadata's ``spot/instance-action`` every 5 s (404: no
  notice) and drains on a notice. It runs only when its URL is configured; the EC2 boot script
  sets it, and nothing else has a default that points at the metadata service.
- ``token_from_parameter`` reads the replica token from SSM Parameter Store (SecureString), so the
  token never appears in the instance's user data.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx

from sidecar.control import ControlPlaneClient, ControlPlaneError

logger = logging.getLogger(__name__)

# IMDSv2 session tokens may live up to 6 hours; a new one is fetched a minute before expiry.
METADATA_TOKEN_SECONDS = 21600


class Heartbeat:
    def __init__(
        self,
        control: ControlPlaneClient,
        on_stop: Callable[[str], None],
        interval: float = 20.0,
    ) -> None:
        self.control = control
        self.on_stop = on_stop
        self.interval = interval
        self.stop_requested = False
        self.log_ids = {"job_id": control.job_id, "replica_id": control.replica_id}

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                answer = await self.control.heartbeat()
            except ControlPlaneError as error:
                failures += 1
                # The first failure and every tenth after it are logged, not each one.
                if failures % 10 == 1:
                    logger.warning(
                        "heartbeat failed",
                        extra={**self.log_ids, "error": str(error), "failures": failures},
                    )
            else:
                failures = 0
                if answer.get("action") == "drain" and not self.stop_requested:
                    self.stop_requested = True
                    reason = f"control plane reports phase {answer.get('phase')}"
                    logger.warning(
                        "control plane asks to drain", extra={**self.log_ids, "reason": reason}
                    )
                    self.on_stop(reason)
            await asyncio.sleep(self.interval)


class SpotNoticePoller:
    def __init__(
        self,
        notice_url: str,
        on_notice: Callable[[str], None],
        *,
        token_url: str | None = None,
        interval: float = 5.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.notice_url = notice_url
        self.token_url = token_url
        self.on_notice = on_notice
        self.interval = interval
        self._http = http or httpx.AsyncClient(timeout=2.0, trust_env=False)
        self._token: str | None = None
        self._token_until = 0.0
        self.notice: dict[str, Any] | None = None

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _headers(self) -> dict[str, str]:
        if self.token_url is None:
            return {}
        if self._token is None or time.monotonic() > self._token_until:
            response = await self._http.put(
                self.token_url,
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(METADATA_TOKEN_SECONDS)},
            )
            response.raise_for_status()
            self._token = response.text.strip()
            self._token_until = time.monotonic() + METADATA_TOKEN_SECONDS - 60
        return {"X-aws-ec2-metadata-token": self._token}

    async def check(self) -> dict[str, Any] | None:
        """Returns the interruption notice, or None while there is none (HTTP 404)."""
        response = await self._http.get(self.notice_url, headers=await self._headers())
        if response.status_code == 404:
            return None
        if response.status_code == 401:
            # The metadata token expired early (the instance's clock jumped): fetch a new one.
            self._token = None
            return None
        response.raise_for_status()
        try:
            notice = response.json()
        except json.JSONDecodeError:
            notice = {"action": response.text.strip()[:100]}
        return notice if isinstance(notice, dict) else {"action": str(notice)}

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                notice = await self.check()
            except httpx.HTTPError as error:
                failures += 1
                if failures % 60 == 1:
                    logger.warning(
                        "spot notice check failed",
                        extra={"url": self.notice_url, "error": str(error), "failures": failures},
                    )
            else:
                failures = 0
                if notice is not None:
                    self.notice = notice
                    reason = (
                        f"spot interruption notice: {notice.get('action')} at {notice.get('time')}"
                    )
                    logger.warning(
                        "spot interruption notice received, draining", extra={"notice": notice}
                    )
                    self.on_notice(reason)
                    return
            await asyncio.sleep(self.interval)


def token_from_parameter(name: str, region: str | None) -> str:
    """Reads the replica token from a SecureString parameter with the instance's credentials."""
    import boto3

    client = boto3.session.Session().client("ssm", region_name=region)
    response = client.get_parameter(Name=name, WithDecryption=True)
    return response["Parameter"]["Value"].strip()
