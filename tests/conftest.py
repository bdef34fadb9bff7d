"""Shared fixtures: an in-process moto account with the project's tables, and Chalice's test client.

Chalice's test client sets the stage's environment variables only during each call, while Lambda
sets them before ``app.py`` is imported; they are copied into ``os.environ`` here to match.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parent.parent
_stage = json.loads((PROJECT_DIR / ".chalice" / "config.json").read_text())["stages"]["test"]
os.environ.update(_stage["environment_variables"])
os.environ.pop("AWS_ENDPOINT_URL", None)

from chalice.test import Client
from moto import mock_aws

from chalicelib import aws as aws_clients
from chalicelib import replicas
from chalicelib.config import load_settings
from tandemn.resources import create_resources


@pytest.fixture
def aws_account():
    with mock_aws():
        aws_clients.reset_clients()
        replicas.clear_auth_cache()
        settings = load_settings()
        create_resources(aws_clients.client("dynamodb"), aws_clients.client("s3"), settings)
        yield settings
    aws_clients.reset_clients()
    replicas.clear_auth_cache()


@pytest.fixture
def client(aws_account):
    from app import app

    with Client(app, stage_name="test", project_dir=str(PROJECT_DIR)) as test_client:
        yield test_client


# The state machine fixture: moto executes the state machines, their tasks run the app's handlers.
from tests.lifecycle_support import lifecycle_stack  # noqa: F401
