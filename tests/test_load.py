"""Many replicas pulling, renewing and completing at once on the local stack lose no chunk and lease
none twice (``bench/load.py`` prints the speed figures of a larger run)."""

from __future__ import annotations

import boto3
import pytest

from bench.load import run_load
from tandemn.motoserver import ThreadedServer
from tests.fault_support import check_job_invariants


@pytest.mark.slow
def test_64_replicas_race_without_double_assignment():
    result, cluster = run_load(num_chunks=200, num_replicas=64, name="load-test")
    try:
        assert result.double_assignments == []
        assert result.pulls == 200
        assert result.completions["completed"] == 200
        assert result.completions["already_completed"] == 0
        assert result.answers[("pull", 204)] == 64
        cluster.wait_for_job(result.job_id, 300)
        check_job_invariants(cluster.moto_url, result.job_id, result.input_ids)
    finally:
        cluster.stop()


def test_motoserver_rolls_back_a_cancelled_transaction():
    server = ThreadedServer(0).start()
    try:
        dynamodb = boto3.session.Session().client(
            "dynamodb",
            endpoint_url=server.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        dynamodb.create_table(
            TableName="chunks",
            KeySchema=[
                {"AttributeName": "job_id", "KeyType": "HASH"},
                {"AttributeName": "chunk_index", "KeyType": "RANGE"},
            ],
            AttributeDefinitions=[
                {"AttributeName": "job_id", "AttributeType": "S"},
                {"AttributeName": "chunk_index", "AttributeType": "N"},
            ],
            BillingMode="PAY_PER_REQUEST",
        )
        dynamodb.create_table(
            TableName="jobs",
            KeySchema=[{"AttributeName": "job_id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "job_id", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        chunk_key = {"job_id": {"S": "j"}, "chunk_index": {"N": "0"}}
        dynamodb.put_item(TableName="chunks", Item={**chunk_key, "status": {"S": "pending"}})
        dynamodb.put_item(TableName="jobs", Item={"job_id": {"S": "j"}, "pending": {"N": "1"}})
        bump_job = {
            "Update": {
                "TableName": "jobs",
                "Key": {"job_id": {"S": "j"}},
                "UpdateExpression": "SET pending = pending - :one",
                "ExpressionAttributeValues": {":one": {"N": "1"}},
            }
        }
        new_chunk = {
            "Put": {
                "TableName": "chunks",
                "Item": {"job_id": {"S": "j"}, "chunk_index": {"N": "1"}, "status": {"S": "x"}},
            }
        }
        failing = {
            "Update": {
                "TableName": "chunks",
                "Key": chunk_key,
                "UpdateExpression": "SET #s = :inflight",
                "ConditionExpression": "#s = :completed",
                "ExpressionAttributeNames": {"#s": "status"},
                "ExpressionAttributeValues": {
                    ":inflight": {"S": "inflight"},
                    ":completed": {"S": "completed"},
                },
            }
        }
        with pytest.raises(dynamodb.exceptions.TransactionCanceledException):
            dynamodb.transact_write_items(TransactItems=[bump_job, new_chunk, failing])
        job = dynamodb.get_item(TableName="jobs", Key={"job_id": {"S": "j"}})["Item"]
        assert job["pending"] == {"N": "1"}
        added = dynamodb.get_item(
            TableName="chunks", Key={"job_id": {"S": "j"}, "chunk_index": {"N": "1"}}
        )
        assert "Item" not in added
        chunk = dynamodb.get_item(TableName="chunks", Key=chunk_key)["Item"]
        assert chunk["status"] == {"S": "pending"}

        dynamodb.transact_write_items(TransactItems=[bump_job, new_chunk])
        job = dynamodb.get_item(TableName="jobs", Key={"job_id": {"S": "j"}})["Item"]
        assert job["pending"] == {"N": "0"}
        assert dynamodb.scan(TableName="chunks")["Count"] == 2
    finally:
        server.stop()
