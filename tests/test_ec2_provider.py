"""The EC2 provider against moto: the RunInstances request, the token, the instance role."""

from __future__ import annotations

import base64
import json

import pytest
from botocore.stub import Stubber
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ssm.models import Parameter, ssm_backends

from chalicelib import aws
from chalicelib.ec2_provider import DLAMI_PARAMETER, EC2Provider, EC2Settings, instance_type_for
from chalicelib.providers import CapacityUnavailable

JOB = "tiny-1b-0123abcd"
REPLICA = f"{JOB}-v2-r0"
TOKEN = "trk_tiny-1b-0123abcd-v2-r0.secret-part-that-must-stay-secret"
API_URL = "http://127.0.0.1:26336"


def seed_public_ami(region: str, image_id: str) -> None:
    """Adds the DLAMI's public parameter, which moto does not ship (PutParameter rejects /aws/)."""
    store = ssm_backends[DEFAULT_ACCOUNT_ID][region]._parameters
    store[DLAMI_PARAMETER].append(
        Parameter(
            account_id=DEFAULT_ACCOUNT_ID,
            name=DLAMI_PARAMETER,
            value=image_id,
            parameter_type="String",
            description=None,
            allowed_pattern=None,
            keyid=None,
            last_modified_date=1.0,
            version=1,
            data_type="aws:ec2:image",
        )
    )


@pytest.fixture
def provider(aws_account):
    seed_public_ami("us-east-1", "ami-12c6146b")
    settings = EC2Settings(
        api_url=API_URL,
        home_region="us-east-1",
        token_parameter_prefix="/tandemn/replica-tokens",
        role_prefix="tandemn-replica-",
        role_boundary_arn=None,
        sidecar_bundle_key="artifacts/sidecar.zip",
        ami_parameter=DLAMI_PARAMETER,
        vllm_version="0.34.0",
        root_volume_gb=200,
    )
    return EC2Provider(settings)


def config(market: str = "spot", **overrides) -> dict:
    base = {
        "gpu_type": "L40S",
        "tp_size": 4,
        "pp_size": 1,
        "market": market,
        "model_name": "Qwen/Qwen2.5-72B-Instruct",
        "max_model_len": 9216,
        "input_bucket": "user-inputs",
        "input_key": "batches/in.jsonl",
        "output_bucket": "tandemn-test",
        "output_prefix": f"jobs/{JOB}/",
    }
    base.update(overrides)
    return base


def recorded_requests(client, operation: str) -> list[dict]:
    requests: list[dict] = []

    def record(params, **_):
        requests.append(dict(params))

    client.meta.events.register(f"provide-client-params.ec2.{operation}", record)
    return requests


def test_run_instances_request_for_spot(provider):
    ec2 = aws.client("ec2")
    requests = recorded_requests(ec2, "RunInstances")
    launched = provider.launch(JOB, REPLICA, TOKEN, config())

    assert len(requests) == 1
    request = requests[0]
    assert request["InstanceType"] == "g6e.12xlarge"
    assert request["ImageId"] == "ami-12c6146b"
    assert request["InstanceMarketOptions"] == {
        "MarketType": "spot",
        "SpotOptions": {
            "SpotInstanceType": "one-time",
            "InstanceInterruptionBehavior": "terminate",
        },
    }
    assert request["IamInstanceProfile"] == {"Name": provider.role_name(JOB)}
    assert request["MetadataOptions"]["HttpTokens"] == "required"
    assert request["InstanceInitiatedShutdownBehavior"] == "terminate"
    for specification in request["TagSpecifications"]:
        tags = {tag["Key"]: tag["Value"] for tag in specification["Tags"]}
        assert tags["tandemn:job-id"] == JOB
        assert tags["tandemn:replica-id"] == REPLICA

    user_data = request["UserData"]
    assert TOKEN not in user_data
    assert "secret-part" not in user_data
    assert "TANDEMN_REPLICA_TOKEN=" not in user_data
    assert f"TANDEMN_REPLICA_TOKEN_PARAMETER=/tandemn/replica-tokens/{JOB}/{REPLICA}" in user_data
    assert f"TANDEMN_API_URL={API_URL}" in user_data
    assert f"TANDEMN_JOB_ID={JOB}" in user_data
    assert f"TANDEMN_REPLICA_ID={REPLICA}" in user_data
    assert "vllm serve Qwen/Qwen2.5-72B-Instruct" in user_data
    assert "--tensor-parallel-size 4" in user_data
    assert "--pipeline-parallel-size 1" in user_data
    assert "--max-model-len 9216" in user_data
    assert "vllm==0.34.0" in user_data

    # What EC2 stored: the instance, its market and tags, and the user data without secrets.
    instance_id = launched["instance_id"]
    assert launched == {
        "instance_id": instance_id,
        "instance_type": "g6e.12xlarge",
        "region": "us-east-1",
        "market": "spot",
    }
    found = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    assert found["InstanceLifecycle"] == "spot"
    assert {t["Key"]: t["Value"] for t in found["Tags"]}["tandemn:replica-id"] == REPLICA
    stored = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    decoded = base64.b64decode(stored["UserData"]["Value"]).decode()
    assert decoded == user_data
    assert TOKEN not in decoded


def test_token_is_a_secure_parameter(provider):
    provider.launch(JOB, REPLICA, TOKEN, config())
    ssm = aws.client("ssm")
    name = f"/tandemn/replica-tokens/{JOB}/{REPLICA}"
    parameter = ssm.get_parameter(Name=name, WithDecryption=True)["Parameter"]
    assert parameter["Type"] == "SecureString"
    assert parameter["Value"] == TOKEN


def test_instance_role_reaches_only_the_job(provider):
    provider.launch(JOB, REPLICA, TOKEN, config())
    iam = aws.client("iam")
    name = provider.role_name(JOB)
    profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    assert [role["RoleName"] for role in profile["Roles"]] == [name]
    document = iam.get_role_policy(RoleName=name, PolicyName="job-access")["PolicyDocument"]
    if isinstance(document, str):
        document = json.loads(document)
    statements = {s["Sid"]: s for s in document["Statement"]}
    assert statements["ReadJobInput"]["Action"] == ["s3:GetObject"]
    assert statements["ReadJobInput"]["Resource"] == [
        "arn:aws:s3:::user-inputs/batches/in.jsonl",
        "arn:aws:s3:::tandemn-test/artifacts/sidecar.zip",
    ]
    assert statements["WriteJobOutput"]["Resource"] == [f"arn:aws:s3:::tandemn-test/jobs/{JOB}/*"]
    assert statements["ReadReplicaTokens"]["Resource"] == [
        f"arn:aws:ssm:us-east-1:{DEFAULT_ACCOUNT_ID}:parameter/tandemn/replica-tokens/{JOB}/*"
    ]
    for statement in document["Statement"]:
        assert "*" not in statement["Action"]
        assert all(resource != "*" for resource in statement["Resource"])
    # A second launch of the same job reuses the role.
    provider.launch(JOB, f"{JOB}-v2-r1", TOKEN + "x", config())
    assert len(iam.list_instance_profiles()["InstanceProfiles"]) == 1


def test_on_demand_has_no_market_options(provider):
    requests = recorded_requests(aws.client("ec2"), "RunInstances")
    provider.launch(JOB, REPLICA, TOKEN, config(market="on_demand", gpu_type="A10G", tp_size=1))
    assert "InstanceMarketOptions" not in requests[0]
    assert requests[0]["InstanceType"] == "g5.xlarge"


def test_capacity_error_becomes_capacity_unavailable(provider):
    ec2 = aws.client("ec2")
    with Stubber(ec2) as stubber:
        stubber.add_client_error(
            "run_instances",
            service_error_code="InsufficientInstanceCapacity",
            service_message="We currently do not have sufficient g6e.12xlarge capacity.",
        )
        with pytest.raises(CapacityUnavailable) as raised:
            provider.launch(JOB, REPLICA, TOKEN, config())
    assert raised.value.code == "InsufficientInstanceCapacity"
    assert "g6e.12xlarge, spot, us-east-1" in str(raised.value)


def test_terminate_ends_the_instance_and_its_token(provider):
    launched = provider.launch(JOB, REPLICA, TOKEN, config())
    provider.terminate(JOB, REPLICA)
    ec2 = aws.client("ec2")
    found = ec2.describe_instances(InstanceIds=[launched["instance_id"]])
    state = found["Reservations"][0]["Instances"][0]["State"]["Name"]
    assert state in ("shutting-down", "terminated")
    ssm = aws.client("ssm")
    with pytest.raises(ssm.exceptions.ParameterNotFound):
        ssm.get_parameter(Name=f"/tandemn/replica-tokens/{JOB}/{REPLICA}")
    provider.cleanup_job(JOB)
    with pytest.raises(aws.client("iam").exceptions.NoSuchEntityException):
        aws.client("iam").get_role(RoleName=provider.role_name(JOB))


@pytest.mark.parametrize(
    ("placement", "expected"),
    [
        ({"gpu_type": "A10G", "tp_size": 1}, "g5.xlarge"),
        ({"gpu_type": "L40S", "tp_size": 2}, "g6e.12xlarge"),
        ({"gpu_type": "H100", "tp_size": 8}, "p5.48xlarge"),
        ({"gpu_type": "L4", "tp_size": 4, "pp_size": 2}, "g6.48xlarge"),
        ({"gpu_type": "H200", "instance_type": "p5en.48xlarge"}, "p5en.48xlarge"),
    ],
)
def test_instance_type_for_placement(placement, expected):
    assert instance_type_for(placement) == expected


def test_unknown_gpu_is_unavailable():
    with pytest.raises(CapacityUnavailable) as raised:
        instance_type_for({"gpu_type": "MI300X", "tp_size": 8})
    assert raised.value.code == "UnsupportedPlacement"
