"""Creates the control plane's tables and bucket from ``infra/template.json``.

The local stack and the tests use this, so they run on exactly the tables a deployment gets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "infra" / "template.json"

# Logical id in the template -> settings attribute holding the physical name.
TABLE_SETTINGS = {
    "JobsTable": "jobs_table",
    "ChunksTable": "chunks_table",
    "ReplicasTable": "replicas_table",
    "MetricsTable": "metrics_table",
    "EventsTable": "events_table",
    "ConnectionsTable": "connections_table",
    "RunsTable": "runs_table",
}


def load_template(path: Path = TEMPLATE_PATH) -> dict[str, Any]:
    return json.loads(path.read_text())


def table_request(properties: dict[str, Any], table_name: str) -> dict[str, Any]:
    """Turns a template's ``AWS::DynamoDB::Table`` properties into ``CreateTable`` arguments."""
    request: dict[str, Any] = {
        "TableName": table_name,
        "AttributeDefinitions": properties["AttributeDefinitions"],
        "KeySchema": properties["KeySchema"],
        "BillingMode": properties.get("BillingMode", "PAY_PER_REQUEST"),
    }
    if "GlobalSecondaryIndexes" in properties:
        request["GlobalSecondaryIndexes"] = properties["GlobalSecondaryIndexes"]
    if "StreamSpecification" in properties:
        stream = properties["StreamSpecification"]
        request["StreamSpecification"] = {
            "StreamEnabled": True,
            "StreamViewType": stream["StreamViewType"],
        }
    return request


def create_resources(dynamodb: Any, s3: Any, settings: Any) -> None:
    """Creates every table and the bucket named in ``settings``; existing ones are kept."""
    resources = load_template()["Resources"]
    existing = set(dynamodb.list_tables()["TableNames"])
    for logical_id, attribute in TABLE_SETTINGS.items():
        name = getattr(settings, attribute)
        if name in existing:
            continue
        properties = resources[logical_id]["Properties"]
        dynamodb.create_table(**table_request(properties, name))
        ttl = properties.get("TimeToLiveSpecification")
        if ttl:
            dynamodb.update_time_to_live(
                TableName=name,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": ttl["AttributeName"]},
            )
    buckets = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if settings.bucket not in buckets:
        s3.create_bucket(Bucket=settings.bucket)
