"""The state machine definitions of ``infra/statemachines/``: loading, creating, packaging.

Each definition names its Lambda function as ``${LifecycleFunctionArn}``. CloudFormation fills it
in through ``DefinitionSubstitutions`` after ``tandemn/package.py`` inlined the definitions into
the template. The local stack and the tests fill it in here and create the machines in moto.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFINITIONS_DIR = PROJECT_DIR / "infra" / "statemachines"
KINDS = ("launch", "scale", "swap", "teardown")
FUNCTION_PLACEHOLDER = "${LifecycleFunctionArn}"
# ARNs the local stack and the tests use; moto accepts any account id.
LOCAL_ACCOUNT = "123456789012"
LOCAL_ROLE_ARN = f"arn:aws:iam::{LOCAL_ACCOUNT}:role/tandemn-state-machines"


def definition_path(kind: str) -> Path:
    return DEFINITIONS_DIR / f"{kind}.asl.json"


def load_definition(kind: str, function_arn: str | None = None) -> dict[str, Any]:
    """Returns a definition; with ``function_arn``, the placeholder replaced by it."""
    text = definition_path(kind).read_text()
    if function_arn is not None:
        text = text.replace(FUNCTION_PLACEHOLDER, function_arn)
    return json.loads(text)


def local_function_arn(region: str) -> str:
    return f"arn:aws:lambda:{region}:{LOCAL_ACCOUNT}:function:lifecycle_task"


def create_local_state_machines(sfn: Any, region: str, prefix: str = "tandemn") -> dict[str, str]:
    """Creates (or reuses) the four state machines in moto; returns kind -> ARN.

    The machines' Lambda tasks reach the app's ``lifecycle_task`` handler through the patch in
    ``tandemn/lambda_bridge.py``.
    """
    existing = {
        machine["name"]: machine["stateMachineArn"]
        for machine in sfn.list_state_machines().get("stateMachines", [])
    }
    arns = {}
    for kind in KINDS:
        name = f"{prefix}-{kind}"
        if name in existing:
            arns[kind] = existing[name]
            continue
        definition = load_definition(kind, local_function_arn(region))
        response = sfn.create_state_machine(
            name=name, definition=json.dumps(definition), roleArn=LOCAL_ROLE_ARN
        )
        arns[kind] = response["stateMachineArn"]
    return arns


def export_machine_arns(arns: dict[str, str], environ: Any = os.environ) -> None:
    """Sets the environment variables that ``chalicelib/executions.py`` reads."""
    from chalicelib.executions import MACHINE_VARIABLES

    for kind, arn in arns.items():
        environ[MACHINE_VARIABLES[kind]] = arn
