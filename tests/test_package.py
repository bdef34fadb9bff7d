"""``chalice package`` with the merged infra template passes cfn-lint, and its IAM is scoped.

Runs what ``make package`` runs, in a temporary folder. The first run on a machine needs PyPI for
Chalice's dependency build; no AWS account is used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tandemn.package import build_sidecar_bundle, merge_template
from tests.conftest import PROJECT_DIR

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def packaged(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("package")
    merged = folder / "merge-template.json"
    merged.write_text(json.dumps(merge_template()))
    environment = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    environment["AWS_DEFAULT_REGION"] = "us-east-1"
    result = subprocess.run(
        [
            str(BIN / "chalice"),
            "package",
            "--stage",
            "dev",
            "--pkg-format",
            "cloudformation",
            "--merge-template",
            str(merged),
            str(folder / "out"),
        ],
        cwd=PROJECT_DIR,
        env=environment,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return {"path": folder / "out" / "sam.json", "environment": environment}


def test_cfn_lint_passes(packaged):
    result = subprocess.run(
        [str(BIN / "cfn-lint"), str(packaged["path"])],
        env=packaged["environment"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _statements(template: dict) -> list[tuple[str, dict]]:
    found = []
    for logical_id, resource in template["Resources"].items():
        properties = resource.get("Properties", {})
        documents = [p["PolicyDocument"] for p in properties.get("Policies", [])]
        if "PolicyDocument" in properties:
            documents.append(properties["PolicyDocument"])
        for document in documents:
            for statement in document["Statement"]:
                found.append((logical_id, statement))
    return found


def test_no_policy_allows_every_action(packaged):
    template = json.loads(packaged["path"].read_text())
    statements = _statements(template)
    assert statements
    for logical_id, statement in statements:
        actions = statement["Action"]
        actions = [actions] if isinstance(actions, str) else actions
        for action in actions:
            assert "*" not in action, f"{logical_id} allows {action}"


def test_template_wires_the_lifecycle(packaged):
    template = json.loads(packaged["path"].read_text())
    resources = template["Resources"]
    for kind in ("Launch", "Scale", "Swap", "Teardown"):
        machine = resources[f"{kind}StateMachine"]["Properties"]
        assert machine["Definition"]["StartAt"]
        assert machine["DefinitionSubstitutions"]["LifecycleFunctionArn"] == {
            "Fn::GetAtt": ["LifecycleTask", "Arn"]
        }
    rule = resources["SpotInterruptionRule"]["Properties"]
    assert rule["EventPattern"]["detail-type"] == ["EC2 Spot Instance Interruption Warning"]
    assert rule["Targets"][0]["Arn"] == {"Fn::GetAtt": ["SpotInterruption", "Arn"]}
    variables = template["Globals"]["Function"]["Environment"]["Variables"]
    assert variables["JOBS_TABLE"] == {"Ref": "JobsTable"}
    assert variables["TANDEMN_PROVIDER"] == "ec2"
    policy_roles = resources["LifecyclePolicy"]["Properties"]["Roles"]
    assert {"Ref": "LifecycleTaskRole"} in policy_roles
    role = resources["StateMachineRole"]["Properties"]["Policies"][0]["PolicyDocument"]
    assert role["Statement"][0]["Action"] == ["lambda:InvokeFunction"]
    bucket = resources["DataBucket"]["Properties"]
    assert bucket["PublicAccessBlockConfiguration"]["BlockPublicPolicy"] is True


def test_sidecar_bundle_holds_the_package(tmp_path):
    names = build_sidecar_bundle(tmp_path / "sidecar.zip")
    assert "sidecar/__main__.py" in names
    assert "sidecar/lifeline.py" in names
    with zipfile.ZipFile(tmp_path / "sidecar.zip") as archive:
        assert sorted(archive.namelist()) == sorted(names)


def test_table_names_reach_functions_by_ref():
    """CloudFormation names the tables, so each one's name must reach the functions by Ref."""
    template = merge_template()
    variables = template["Globals"]["Function"]["Environment"]["Variables"]
    referenced = {value.get("Ref") for value in variables.values() if isinstance(value, dict)}
    tables = {
        logical_id
        for logical_id, resource in template["Resources"].items()
        if resource.get("Type") == "AWS::DynamoDB::Table"
    }
    assert tables - referenced == set()


def test_uploaded_inputs_outlive_the_longest_deadline():
    from chalicelib.models import SubmitBatchRequest

    bucket = merge_template()["Resources"]["DataBucket"]["Properties"]
    rules = {rule["Id"]: rule for rule in bucket["LifecycleConfiguration"]["Rules"]}
    expiry = rules["ExpireUploadedInputs"]
    assert expiry["Prefix"] == "inputs/"
    # An input must outlive its job, whose deadline is at most 720 h.
    limits = SubmitBatchRequest.model_fields["slo_deadline_hours"].metadata
    longest_deadline = next(limit.le for limit in limits if hasattr(limit, "le"))
    assert expiry["ExpirationInDays"] * 24 > longest_deadline
    assert rules["AbortIncompleteMultipartUploads"]["AbortIncompleteMultipartUpload"] == {
        "DaysAfterInitiation": 7
    }
