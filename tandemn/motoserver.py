"""A moto server for the local stack, with its DynamoDB requests serialised.

moto evaluates a condition expression and then writes without a lock, so two threads can both
pass the same condition (measured with moto 5.2.5). The chunk queue's correctness rests on
conditional writes being atomic, as they are on DynamoDB, so every DynamoDB request here runs
under one lock. Other services (S3 reads and writes of chunk data) run concurrently.

With ``--lambda-url`` it also executes state machines (moto's Step Functions interpreter) and
sends their Lambda tasks to the local stack's API process.

Run: ``python -m tandemn.motoserver --port 26337`` (listens on 127.0.0.1 only).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable
from typing import Any

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import BaseWSGIServer, make_server

logger = logging.getLogger(__name__)


class SerialisedDynamoDB:
    """WSGI middleware that runs DynamoDB requests one at a time."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        if not target.startswith("DynamoDB_"):
            return self.app(environ, start_response)
        with self.lock:
            # Consume the response inside the lock: moto builds it eagerly, but a lazy iterable
            # would otherwise run after the lock is released.
            return list(self.app(environ, start_response))


class _TableSharingCopy:
    """Stands in for the ``copy`` module inside moto's DynamoDB backend: returns a stream-less
    ``Table`` itself instead of a deep copy, and deep-copies everything else as before."""

    def __init__(self, table_type: type) -> None:
        self._table_type = table_type

    def deepcopy(self, value: Any, memo: Any = None) -> Any:
        if isinstance(value, self._table_type) and value.stream_shard is None:
            return value
        return copy.deepcopy(value, memo)

    def __getattr__(self, name: str) -> Any:
        return getattr(copy, name)


def use_item_level_transaction_rollback() -> None:
    """Makes a TransactWriteItems cost O(items it touches) instead of O(items in its tables).

    moto 5.2.5 deep-copies every table a transaction names before applying it, to roll back a
    cancelled one, so each chunk lease, renewal or completion copied the whole chunks table (a
    20,000-chunk job: every item, on every request). Here only the touched items are copied and
    put back. Tables with a stream keep moto's whole-table copy, so that a cancelled transaction
    leaves no stream records. This is safe only because this server runs DynamoDB requests one at
    a time.
    """
    import moto.dynamodb.models as backend_module
    from moto.dynamodb.models import DynamoDBBackend
    from moto.dynamodb.models.dynamo_type import DynamoType
    from moto.dynamodb.models.table import Table

    if getattr(DynamoDBBackend.transact_write_items, "_item_level", False):
        return
    backend_module.copy = _TableSharingCopy(Table)
    moto_transact = DynamoDBBackend.transact_write_items

    def transact_write_items(self: Any, transact_items: list[dict[str, Any]]) -> None:
        saved = []
        for entry in transact_items:
            operation = next(iter(entry.values()), None)
            table = self.tables.get((operation or {}).get("TableName"))
            if table is None or table.stream_shard is not None:
                continue
            key = operation.get("Key") or operation.get("Item") or {}
            if table.hash_key_attr not in key:
                continue
            hash_key = DynamoType(key[table.hash_key_attr])
            range_key = None
            if table.range_key_attr is not None:
                if table.range_key_attr not in key:
                    continue
                range_key = DynamoType(key[table.range_key_attr])
            before = table.get_item(hash_key, range_key)
            saved.append((table, hash_key, range_key, copy.deepcopy(before)))
        try:
            moto_transact(self, transact_items)
        except Exception:
            for table, hash_key, range_key, before in reversed(saved):
                items = table.items[hash_key] if range_key is not None else table.items
                item_key = range_key if range_key is not None else hash_key
                if before is None:
                    items.pop(item_key, None)
                else:
                    items[item_key] = before
                if range_key is not None and not table.items[hash_key]:
                    del table.items[hash_key]
            raise

    transact_write_items._item_level = True  # type: ignore[attr-defined]
    DynamoDBBackend.transact_write_items = transact_write_items


def build_server(port: int) -> BaseWSGIServer:
    use_item_level_transaction_rollback()
    app = SerialisedDynamoDB(DomainDispatcherApplication(create_backend_app))
    return make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)


class ThreadedServer:
    """The same server on a background thread, for tests that need it inside their process."""

    def __init__(self, port: int = 0) -> None:
        os.environ.setdefault("MOTO_PORT", str(port))
        self.server = build_server(port)
        self.port = self.server.server_address[1]
        os.environ["MOTO_PORT"] = str(self.port)
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> ThreadedServer:
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def enable_state_machines(lambda_url: str, secret: str) -> None:
    """Executes state machines in this server, their Lambda tasks in the process at ``lambda_url``.

    The local stack's API process runs the app; ``tandemn/lambda_bridge.py`` carries each Lambda
    invocation of the interpreter there.
    """
    from moto.core.config import default_user_config

    from tandemn import lambda_bridge

    lambda_bridge.enable_execution(default_user_config)
    lambda_bridge.install_forwarding(lambda_url, secret)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=26337, help="TCP port on 127.0.0.1")
    parser.add_argument(
        "--lambda-url",
        default=None,
        help="127.0.0.1 URL of the process that runs the state machines' Lambda tasks; the "
        "bridge secret comes from $TANDEMN_LAMBDA_BRIDGE_SECRET; default: state machines do "
        "not execute",
    )
    args = parser.parse_args()
    # moto's Step Functions interpreter calls other services at localhost:$MOTO_PORT.
    os.environ["MOTO_PORT"] = str(args.port)
    if args.lambda_url:
        enable_state_machines(args.lambda_url, os.environ.get("TANDEMN_LAMBDA_BRIDGE_SECRET", ""))
    server = build_server(args.port)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    logging.basicConfig(level=logging.WARNING)
    print(f"moto server listening on http://127.0.0.1:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
