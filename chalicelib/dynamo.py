"""Small helpers over the low-level DynamoDB client: (de)serialisation and failed conditions."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError

_serializer = TypeSerializer()
_deserializer = TypeDeserializer()


def _to_dynamo_value(value: Any) -> Any:
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, dict):
        return {k: _to_dynamo_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_dynamo_value(v) for v in value]
    return value


def _from_dynamo_value(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: _from_dynamo_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_dynamo_value(v) for v in value]
    if isinstance(value, set):
        return {_from_dynamo_value(v) for v in value}
    return value


def serialize(values: dict[str, Any]) -> dict[str, Any]:
    return {k: _serializer.serialize(_to_dynamo_value(v)) for k, v in values.items()}


def serialize_value(value: Any) -> dict[str, Any]:
    return _serializer.serialize(_to_dynamo_value(value))


def deserialize(item: dict[str, Any] | None) -> dict[str, Any] | None:
    if item is None:
        return None
    return {k: _from_dynamo_value(_deserializer.deserialize(v)) for k, v in item.items()}


def is_condition_failure(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"


def is_transaction_cancelled(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") == "TransactionCanceledException"


def cancellation_codes(error: ClientError) -> list[str | None]:
    """Returns one code per transaction item, such as ``ConditionalCheckFailed`` or None."""
    reasons = error.response.get("CancellationReasons")
    if reasons:
        return [r.get("Code") if r.get("Code") != "None" else None for r in reasons]
    # moto puts the reasons only in the message: "... [ConditionalCheckFailed, None]".
    message = error.response.get("Error", {}).get("Message", "")
    start, end = message.rfind("["), message.rfind("]")
    if start == -1 or end < start:
        return []
    return [
        None if part.strip() == "None" else part.strip()
        for part in message[start + 1 : end].split(",")
    ]
