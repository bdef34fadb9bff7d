"""Runs follow-up work (output assembly, validation of large inputs) outside the request.

``TANDEMN_ASYNC_MODE`` picks how: ``lambda`` invokes the ``run_background_task`` function
asynchronously (deployed stage), ``thread`` starts a daemon thread (local stack), ``inline`` runs
the task before returning (tests). Every task is idempotent, and the watchdog re-runs the ones
whose effect is missing, so a lost invocation delays work but loses none.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from chalicelib import aws
from chalicelib.config import load_settings

logger = logging.getLogger(__name__)

_tasks: dict[str, Callable[[dict[str, Any]], None]] = {}


def task(
    name: str,
) -> Callable[[Callable[[dict[str, Any]], None]], Callable[[dict[str, Any]], None]]:
    def register(function: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
        _tasks[name] = function
        return function

    return register


def run(name: str, payload: dict[str, Any]) -> None:
    """Runs a registered task in this process, logging a failure instead of raising it."""
    try:
        _tasks[name](payload)
    except Exception:
        logger.exception("background task failed", extra={"task": name, **payload})


def submit(name: str, payload: dict[str, Any]) -> None:
    if name not in _tasks:
        raise KeyError(f"unknown background task {name!r}")
    settings = load_settings()
    if settings.async_mode == "inline":
        run(name, payload)
    elif settings.async_mode == "lambda":
        aws.client("lambda").invoke(
            FunctionName=settings.async_function_name,
            InvocationType="Event",
            Payload=json.dumps({"task": name, "payload": payload}).encode(),
        )
    else:
        threading.Thread(target=run, args=(name, payload), name=f"task-{name}", daemon=True).start()
    logger.info("background task submitted", extra={"task": name, **payload})
