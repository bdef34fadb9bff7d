"""Shared set-up for benchmarks that drive the app in-process under moto."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))


def use_test_stage() -> None:
    stage = json.loads((PROJECT_DIR / ".chalice" / "config.json").read_text())["stages"]["test"]
    os.environ.update(stage["environment_variables"])
    os.environ.pop("AWS_ENDPOINT_URL", None)


def machine_line() -> str:
    return (
        f"machine: {platform.machine()} {platform.system()} {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; date {time.strftime('%Y-%m-%d')}"
    )
