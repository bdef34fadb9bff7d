"""The EC2 provider: each replica is one GPU instance running vLLM and the sidecar.

A launch looks up the region's Deep Learning AMI in its public SSM parameter. It stores the
replica token as a SecureString parameter that only the job's instance role can read, and makes
sure the job's instance role and profile exist. Then it calls RunInstances (spot or on-demand)
with the tags ``tandemn:job-id`` and ``tandemn:replica-id`` and a boot script (user data) that
starts ``vllm serve`` and the sidecar. The user data contains no secret, because the sidecar
reads the token from Parameter Store at boot.

The job's instance role may read the job's input object and the sidecar bundle, write under the
job's output prefix, and read the job's token parameters; nothing else. Its permission boundary
(``TANDEMN_REPLICA_ROLE_BOUNDARY``) caps it further.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import time
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from chalicelib import aws, replicas
from chalicelib.config import load_settings
from chalicelib.providers import CapacityUnavailable, InstanceProfileNotReady

logger = logging.getLogger(__name__)

# AWS publishes the id of the newest Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04,
# x86_64: NVIDIA driver, CUDA, Docker, Python 3.12) under this public SSM parameter in every
# region. The AWS DLAMI Developer Guide lists the name in that AMI's release notes.
DLAMI_PARAMETER = (
    "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"
)
# The Ubuntu DLAMI's root device.
ROOT_DEVICE = "/dev/sda1"
# vLLM version installed at boot (PyPI); override with TANDEMN_VLLM_VERSION.
VLLM_VERSION = "0.34.0"
# The sidecar's dependencies, pinned to the versions in requirements.txt and requirements-dev.txt.
SIDECAR_PACKAGES = (
    "httpx==0.28.1",
    "pydantic==2.14.4",
    "boto3==1.44.8",
    "prometheus-client==0.26.0",
    "nvidia-ml-py==13.615.71",
)
# The instance metadata service of every EC2 instance (IMDSv2). Only user data names it: the
# sidecar's spot notice poller is off unless it is given this URL.
INSTANCE_METADATA_URL = "http://169.254.169.254"
SPOT_NOTICE_PATH = "/latest/meta-data/spot/instance-action"
ENGINE_PORT = 8000

# RunInstances errors that mean "no capacity or quota for this placement": the launch moves to
# the next candidate. Unsupported: the instance type is not offered in the zone EC2 picked.
CAPACITY_ERRORS = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientHostCapacity",
        "MaxSpotInstanceCountExceeded",
        "SpotMaxPriceTooLow",
        "VcpuLimitExceeded",
        "InstanceLimitExceeded",
        "Unsupported",
    }
)

# GPU model -> (instance type, GPUs), fewest GPUs first. A placement that names an instance
# type uses it as given. Otherwise the smallest type with tp_size * pp_size GPUs is taken.
# NOTE: the list is short; placements from the instance catalog name their instance_type.
INSTANCE_TYPES: dict[str, tuple[tuple[str, int], ...]] = {
    "T4": (("g4dn.xlarge", 1), ("g4dn.12xlarge", 4), ("g4dn.metal", 8)),
    "A10G": (("g5.xlarge", 1), ("g5.12xlarge", 4), ("g5.48xlarge", 8)),
    "L4": (("g6.xlarge", 1), ("g6.12xlarge", 4), ("g6.48xlarge", 8)),
    "L40S": (("g6e.xlarge", 1), ("g6e.12xlarge", 4), ("g6e.48xlarge", 8)),
    "A100": (("p4d.24xlarge", 8),),
    "A100-80GB": (("p4de.24xlarge", 8),),
    "H100": (("p5.48xlarge", 8),),
    "H200": (("p5e.48xlarge", 8),),
    "B200": (("p6-b200.48xlarge", 8),),
}


def instance_type_for(placement: dict[str, Any]) -> str:
    """Returns the placement's instance type; raises CapacityUnavailable when none fits."""
    if placement.get("instance_type"):
        return str(placement["instance_type"])
    gpu = str(placement.get("gpu_type") or "").upper().removeprefix("NVIDIA ").strip()
    gpus = int(placement.get("tp_size") or 1) * int(placement.get("pp_size") or 1)
    for instance_type, count in INSTANCE_TYPES.get(gpu, ()):
        if count >= gpus:
            return instance_type
    raise CapacityUnavailable(
        "UnsupportedPlacement",
        f"no EC2 instance type with {gpus} x {placement.get('gpu_type')!r} GPUs is known; "
        f"known GPU types: {', '.join(sorted(INSTANCE_TYPES))}",
    )


@dataclass(frozen=True)
class EC2Settings:
    # Public URL of the control-plane API that sidecars call.
    api_url: str
    # Region of the control plane: its bucket, tables and token parameters.
    home_region: str
    token_parameter_prefix: str
    role_prefix: str
    role_boundary_arn: str | None
    sidecar_bundle_key: str
    ami_parameter: str
    vllm_version: str
    root_volume_gb: int

    @classmethod
    def from_environment(cls) -> EC2Settings:
        return cls(
            api_url=os.environ.get("TANDEMN_API_URL", "").rstrip("/"),
            home_region=os.environ.get("AWS_DEFAULT_REGION")
            or os.environ.get("AWS_REGION")
            or "us-east-1",
            token_parameter_prefix=os.environ.get(
                "TANDEMN_TOKEN_PARAMETER_PREFIX", "/tandemn/replica-tokens"
            ).rstrip("/"),
            role_prefix=os.environ.get("TANDEMN_REPLICA_ROLE_PREFIX", "tandemn-replica-"),
            role_boundary_arn=os.environ.get("TANDEMN_REPLICA_ROLE_BOUNDARY") or None,
            sidecar_bundle_key=os.environ.get(
                "TANDEMN_SIDECAR_BUNDLE_KEY", "artifacts/sidecar.zip"
            ),
            ami_parameter=os.environ.get("TANDEMN_AMI_PARAMETER", DLAMI_PARAMETER),
            vllm_version=os.environ.get("TANDEMN_VLLM_VERSION", VLLM_VERSION),
            root_volume_gb=int(os.environ.get("TANDEMN_ROOT_VOLUME_GB", "200")),
        )


class EC2Provider:
    name = "ec2"

    def __init__(self, settings: EC2Settings) -> None:
        self.settings = settings

    @classmethod
    def from_environment(cls) -> EC2Provider:
        return cls(EC2Settings.from_environment())

    # Names.

    def token_parameter(self, job_id: str, replica_id: str) -> str:
        return f"{self.settings.token_parameter_prefix}/{job_id}/{replica_id}"

    def role_name(self, job_id: str) -> str:
        # IAM role names hold at most 64 characters; job ids hold up to 80.
        digest = hashlib.sha256(job_id.encode()).hexdigest()[:24]
        return f"{self.settings.role_prefix}{digest}"[:64]

    # Launch.

    def launch(
        self, job_id: str, replica_id: str, token: str, config: dict[str, Any]
    ) -> dict[str, Any]:
        if not self.settings.api_url:
            raise RuntimeError(
                "TANDEMN_API_URL is not set; the EC2 provider needs the API's public URL to "
                "hand to the sidecar"
            )
        region = config.get("region") or self.settings.home_region
        market = config.get("market") or "spot"
        instance_type = instance_type_for(config)
        image_id = self._image_id(region)
        self._store_token(job_id, replica_id, token)
        profile = self.ensure_instance_profile(job_id, config)
        request = self.run_instances_request(
            job_id,
            replica_id,
            config,
            instance_type=instance_type,
            image_id=image_id,
            market=market,
            profile=profile,
            # One RunInstances per attempt even when the Lambda is retried: the token is new for
            # each attempt, so its hash names the attempt.
            client_token=hashlib.sha256(token.encode()).hexdigest()[:64],
        )
        try:
            response = aws.regional_client("ec2", region).run_instances(**request)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            message = error.response.get("Error", {}).get("Message", "")
            if code in CAPACITY_ERRORS:
                raise CapacityUnavailable(
                    code, f"{message} ({instance_type}, {market}, {region})"
                ) from error
            if code == "InvalidParameterValue" and "iamInstanceProfile" in message:
                raise InstanceProfileNotReady(message) from error
            raise
        instance = response["Instances"][0]
        logger.info(
            "ec2 instance launched",
            extra={
                "job_id": job_id,
                "replica_id": replica_id,
                "instance_id": instance["InstanceId"],
                "instance_type": instance_type,
                "market": market,
                "region": region,
            },
        )
        return {
            "instance_id": instance["InstanceId"],
            "instance_type": instance_type,
            "region": region,
            "market": market,
        }

    def run_instances_request(
        self,
        job_id: str,
        replica_id: str,
        config: dict[str, Any],
        *,
        instance_type: str,
        image_id: str,
        market: str,
        profile: str,
        client_token: str,
    ) -> dict[str, Any]:
        tags = [
            {"Key": "Name", "Value": f"tandemn {replica_id}"},
            {"Key": "tandemn:job-id", "Value": job_id},
            {"Key": "tandemn:replica-id", "Value": replica_id},
        ]
        request: dict[str, Any] = {
            "ImageId": image_id,
            "InstanceType": instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "ClientToken": client_token,
            "IamInstanceProfile": {"Name": profile},
            "UserData": self.user_data(job_id, replica_id, config),
            # The boot script powers off on failure and after the sidecar exits. Terminating then
            # leaves no stopped instance that still pays for its volume.
            "InstanceInitiatedShutdownBehavior": "terminate",
            "MetadataOptions": {
                "HttpTokens": "required",
                "HttpEndpoint": "enabled",
                "HttpPutResponseHopLimit": 1,
            },
            "BlockDeviceMappings": [
                {
                    "DeviceName": ROOT_DEVICE,
                    "Ebs": {
                        "VolumeSize": self.settings.root_volume_gb,
                        "VolumeType": "gp3",
                        "Encrypted": True,
                        "DeleteOnTermination": True,
                    },
                }
            ],
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": tags},
                {"ResourceType": "volume", "Tags": tags},
            ],
        }
        if market == "spot":
            request["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {
                    "SpotInstanceType": "one-time",
                    "InstanceInterruptionBehavior": "terminate",
                },
            }
        return request

    def user_data(self, job_id: str, replica_id: str, config: dict[str, Any]) -> str:
        """Builds the boot script, which contains ids, URLs and the token's parameter name only."""
        settings = self.settings
        tp = int(config.get("tp_size") or 1)
        pp = int(config.get("pp_size") or 1)
        model = str(config.get("model_name") or "")
        environment = {
            "TANDEMN_API_URL": settings.api_url,
            "TANDEMN_JOB_ID": job_id,
            "TANDEMN_REPLICA_ID": replica_id,
            "TANDEMN_ENGINE_URL": f"http://127.0.0.1:{ENGINE_PORT}",
            "TANDEMN_SERVED_MODEL": model,
            "TANDEMN_REPLICA_TOKEN_PARAMETER": self.token_parameter(job_id, replica_id),
            "TANDEMN_REPLICA_TOKEN_REGION": settings.home_region,
            "TANDEMN_SPOT_NOTICE_URL": f"{INSTANCE_METADATA_URL}{SPOT_NOTICE_PATH}",
            "TANDEMN_METADATA_TOKEN_URL": f"{INSTANCE_METADATA_URL}/latest/api/token",
            "TANDEMN_ENGINE_READY_TIMEOUT": str(int(config.get("ready_timeout_seconds") or 2700)),
            "AWS_DEFAULT_REGION": settings.home_region,
        }
        env_file = "\n".join(f"{key}={value}" for key, value in environment.items())
        engine = " ".join(
            shlex.quote(part)
            for part in (
                "/opt/tandemn/vllm/bin/vllm",
                "serve",
                model,
                "--host",
                "127.0.0.1",
                "--port",
                str(ENGINE_PORT),
                "--tensor-parallel-size",
                str(tp),
                "--pipeline-parallel-size",
                str(pp),
                "--max-model-len",
                str(int(config.get("max_model_len") or 8192)),
            )
        )
        bundle = f"s3://{config.get('output_bucket')}/{settings.sidecar_bundle_key}"
        after_sidecar = "true" if config.get("persist") else "shutdown -h now"
        packages = " ".join(SIDECAR_PACKAGES)
        # NOTE: this script has been checked for its content only, never booted on a GPU instance.
        return f"""#!/bin/bash
# Tandemn replica {replica_id} of job {job_id}, written by the control plane's EC2 provider.
set -euo pipefail
exec >>/var/log/tandemn-boot.log 2>&1
# A failed boot step powers the instance off, which terminates it. The launch state machine
# then tries the next placement candidate.
trap 'echo "boot failed at line $LINENO"; shutdown -h now' ERR
mkdir -p /opt/tandemn
umask 077
cat >/opt/tandemn/replica.env <<'ENVIRONMENT'
{env_file}
ENVIRONMENT
if ! python3 -m venv /opt/tandemn/sidecar; then
    apt-get update -q && apt-get install -y -q python3-venv
    python3 -m venv /opt/tandemn/sidecar
fi
/opt/tandemn/sidecar/bin/pip install --quiet {packages}
/opt/tandemn/sidecar/bin/python - <<'DOWNLOAD'
import boto3
boto3.client("s3", region_name="{settings.home_region}").download_file(
    "{config.get("output_bucket")}", "{settings.sidecar_bundle_key}", "/opt/tandemn/sidecar.zip"
)
DOWNLOAD
cat >/etc/systemd/system/tandemn-sidecar.service <<'UNIT'
[Unit]
Description=Tandemn sidecar ({bundle})
[Service]
EnvironmentFile=/opt/tandemn/replica.env
Environment=PYTHONPATH=/opt/tandemn/sidecar.zip
ExecStart=/opt/tandemn/sidecar/bin/python -m sidecar
ExecStopPost=/bin/sh -c 'systemctl stop tandemn-engine; {after_sidecar}'
UNIT
cat >/etc/systemd/system/tandemn-engine.service <<'UNIT'
[Unit]
Description=vLLM engine
[Service]
Environment=HF_HOME=/opt/tandemn/huggingface
ExecStart={engine}
UNIT
systemctl daemon-reload
# The sidecar starts first: it reports loading_model and sends heartbeats while vLLM installs
# and loads the model.
systemctl start tandemn-sidecar
python3 -m venv /opt/tandemn/vllm
/opt/tandemn/vllm/bin/pip install --quiet vllm=={settings.vllm_version}
systemctl start tandemn-engine
"""

    def _image_id(self, region: str) -> str:
        response = aws.regional_client("ssm", region).get_parameter(
            Name=self.settings.ami_parameter
        )
        return response["Parameter"]["Value"]

    def _store_token(self, job_id: str, replica_id: str, token: str) -> None:
        aws.client("ssm").put_parameter(
            Name=self.token_parameter(job_id, replica_id),
            Value=token,
            Type="SecureString",
            Overwrite=True,
            Description=f"replica token of {replica_id}",
        )

    # The job's instance role.

    def instance_policy(self, job_id: str, config: dict[str, Any]) -> dict[str, Any]:
        """Returns the job role's only permissions: its input, its output prefix, its tokens."""
        account = _account_id()
        bucket = config.get("output_bucket")
        prefix = str(config.get("output_prefix") or f"jobs/{job_id}/")
        region = self.settings.home_region
        return {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "ReadJobInput",
                    "Effect": "Allow",
                    "Action": ["s3:GetObject"],
                    "Resource": [
                        f"arn:aws:s3:::{config.get('input_bucket')}/{config.get('input_key')}",
                        f"arn:aws:s3:::{bucket}/{self.settings.sidecar_bundle_key}",
                    ],
                },
                {
                    "Sid": "WriteJobOutput",
                    "Effect": "Allow",
                    "Action": ["s3:PutObject", "s3:AbortMultipartUpload"],
                    "Resource": [f"arn:aws:s3:::{bucket}/{prefix}*"],
                },
                {
                    "Sid": "ReadReplicaTokens",
                    "Effect": "Allow",
                    "Action": ["ssm:GetParameter"],
                    "Resource": [
                        (
                            f"arn:aws:ssm:{region}:{account}:parameter"
                            f"{self.settings.token_parameter_prefix}/{job_id}/*"
                        )
                    ],
                },
            ],
        }

    def ensure_instance_profile(self, job_id: str, config: dict[str, Any]) -> str:
        """Creates the job's role and instance profile when missing; returns the profile name."""
        iam = aws.client("iam")
        name = self.role_name(job_id)
        try:
            profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
            if profile.get("Roles"):
                return name
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "NoSuchEntity":
                raise
            profile = None
        trust = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Service": "ec2.amazonaws.com"},
                    "Action": "sts:AssumeRole",
                }
            ],
        }
        role: dict[str, Any] = {
            "RoleName": name,
            "AssumeRolePolicyDocument": json.dumps(trust),
            "Description": f"Tandemn replicas of job {job_id}",
            "Tags": [{"Key": "tandemn:job-id", "Value": job_id}],
        }
        if self.settings.role_boundary_arn:
            role["PermissionsBoundary"] = self.settings.role_boundary_arn
        _ignore_existing(iam.create_role, **role)
        iam.put_role_policy(
            RoleName=name,
            PolicyName="job-access",
            PolicyDocument=json.dumps(self.instance_policy(job_id, config)),
        )
        if profile is None:
            _ignore_existing(iam.create_instance_profile, InstanceProfileName=name)
        try:
            iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "LimitExceeded":
                raise
        logger.info("job instance profile created", extra={"job_id": job_id, "profile": name})
        return name

    # Termination.

    def _regions_of(self, job_id: str, replica_id: str) -> set[str]:
        regions = {self.settings.home_region}
        replica = replicas.get_replica(load_settings(), job_id, replica_id) or {}
        if replica.get("region"):
            regions.add(replica["region"])
        for attempt in replica.get("launch_attempts") or []:
            if attempt.get("region"):
                regions.add(attempt["region"])
        return regions

    def terminate(self, job_id: str, replica_id: str) -> None:
        """Terminates every instance tagged with the replica's id, in each region it tried."""
        for region in sorted(self._regions_of(job_id, replica_id)):
            ec2 = aws.regional_client("ec2", region)
            response = ec2.describe_instances(
                Filters=[
                    {"Name": "tag:tandemn:replica-id", "Values": [replica_id]},
                    {"Name": "tag:tandemn:job-id", "Values": [job_id]},
                    {
                        "Name": "instance-state-name",
                        "Values": ["pending", "running", "stopping", "stopped"],
                    },
                ]
            )
            ids = [
                instance["InstanceId"]
                for reservation in response.get("Reservations", [])
                for instance in reservation.get("Instances", [])
            ]
            if ids:
                ec2.terminate_instances(InstanceIds=ids)
                logger.info(
                    "ec2 instances terminated",
                    extra={"job_id": job_id, "replica_id": replica_id, "instance_ids": ids},
                )
        try:
            aws.client("ssm").delete_parameter(Name=self.token_parameter(job_id, replica_id))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "ParameterNotFound":
                raise

    def cleanup_job(self, job_id: str) -> None:
        """Deletes the job's instance profile and role once its instances are terminated."""
        iam = aws.client("iam")
        name = self.role_name(job_id)
        for call, arguments in (
            (
                iam.remove_role_from_instance_profile,
                {"InstanceProfileName": name, "RoleName": name},
            ),
            (iam.delete_instance_profile, {"InstanceProfileName": name}),
            (iam.delete_role_policy, {"RoleName": name, "PolicyName": "job-access"}),
            (iam.delete_role, {"RoleName": name}),
        ):
            try:
                call(**arguments)
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") != "NoSuchEntity":
                    raise
        logger.info("job instance profile deleted", extra={"job_id": job_id, "profile": name})


def _ignore_existing(call: Any, **arguments: Any) -> None:
    try:
        call(**arguments)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") != "EntityAlreadyExists":
            raise


_account: dict[str, tuple[float, str]] = {}


def _account_id() -> str:
    """The AWS account id of this process's credentials (STS), remembered for an hour."""
    cached = _account.get("id")
    if cached and cached[0] > time.monotonic():
        return cached[1]
    account = aws.client("sts").get_caller_identity()["Account"]
    _account["id"] = (time.monotonic() + 3600, account)
    return account
