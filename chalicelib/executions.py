"""Step Functions plumbing: which state machine runs what, execution names, task tokens.

The state machines (``infra/statemachines/``) are named by environment variables that hold
their ARNs: ``TANDEMN_LAUNCH_STATE_MACHINE``, ``TANDEMN_SCALE_STATE_MACHINE``,
``TANDEMN_SWAP_STATE_MACHINE`` and ``TANDEMN_TEARDOWN_STATE_MACHINE``. The CloudFormation
template sets them in a deployment, the local stack after it creates the machines in moto.

Execution names derive from the job id and the replica version (``<job>-v<N>-scale``,
``<replica>-launch``), so a retried trigger finds the execution already started instead of
starting a second one. Inputs carry ids only: Step Functions limits an input to 256 KB.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

from botocore.exceptions import ClientError

from chalicelib import aws
from chalicelib.errors import ControlPlaneError

logger = logging.getLogger(__name__)

MACHINE_VARIABLES = {
    "launch": "TANDEMN_LAUNCH_STATE_MACHINE",
    "scale": "TANDEMN_SCALE_STATE_MACHINE",
    "swap": "TANDEMN_SWAP_STATE_MACHINE",
    "teardown": "TANDEMN_TEARDOWN_STATE_MACHINE",
}
# Step Functions allows execution names of 1 to 80 characters.
MAX_EXECUTION_NAME = 80
# Errors of SendTask* that mean the task already ended (succeeded, failed, timed out).
_TASK_GONE = ("TaskTimedOut", "InvalidToken", "TaskDoesNotExist")


class StateMachineMissing(ControlPlaneError):
    status_code = 500
    code = "state_machine_missing"


def machine_arn(kind: str) -> str | None:
    return os.environ.get(MACHINE_VARIABLES[kind]) or None


def require_machine(kind: str) -> str:
    arn = machine_arn(kind)
    if arn is None:
        raise StateMachineMissing(
            f"the {kind} state machine is not configured; set {MACHINE_VARIABLES[kind]} to its "
            "ARN (the CloudFormation stack and the local stack set it)"
        )
    return arn


def execution_name(*parts: str) -> str:
    """Joins ``parts`` with '-'. A name over 80 characters ends with a hash in place of its tail."""
    name = "-".join(parts)
    if len(name) <= MAX_EXECUTION_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"{name[: MAX_EXECUTION_NAME - 17]}-{digest}"


def execution_arn(machine: str, name: str) -> str:
    # arn:aws:states:REGION:ACCOUNT:stateMachine:MACHINE -> ...:execution:MACHINE:NAME
    return machine.replace(":stateMachine:", ":execution:", 1) + f":{name}"


def start(kind: str, name: str, payload: dict[str, Any]) -> tuple[str, bool]:
    """Starts an execution; returns its ARN and whether this call started it.

    An execution of the same name that already exists (running or finished) is not started
    again: that is how a retried trigger stays harmless.
    """
    machine = require_machine(kind)
    client = aws.client("stepfunctions")
    try:
        response = client.start_execution(
            stateMachineArn=machine, name=name, input=json.dumps(payload)
        )
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") != "ExecutionAlreadyExists":
            raise
        logger.info("execution already exists", extra={"execution": name, "machine": kind})
        return execution_arn(machine, name), False
    logger.info("execution started", extra={"execution": name, "machine": kind, **payload})
    return response["executionArn"], True


def status(kind: str, name: str) -> str | None:
    """Returns an execution's status (RUNNING, SUCCEEDED, ...), or None when it does not exist."""
    machine = machine_arn(kind)
    if machine is None:
        return None
    try:
        response = aws.client("stepfunctions").describe_execution(
            executionArn=execution_arn(machine, name)
        )
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") == "ExecutionDoesNotExist":
            return None
        raise
    return response["status"]


def _send(method: str, token: str, **arguments: Any) -> bool:
    try:
        getattr(aws.client("stepfunctions"), method)(taskToken=token, **arguments)
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code")
        if code in _TASK_GONE:
            logger.info("task token already ended", extra={"call": method, "error_code": code})
            return False
        raise
    return True


def task_success(token: str, output: dict[str, Any]) -> bool:
    return _send("send_task_success", token, output=json.dumps(output))


def task_failure(token: str, error: str, cause: str) -> bool:
    return _send("send_task_failure", token, error=error, cause=cause[:32_000])


def task_heartbeat(token: str) -> bool:
    return _send("send_task_heartbeat", token)
