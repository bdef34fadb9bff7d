"""Time for the dashboard page to draw 20 jobs of 16 replicas each in headless Chromium.

The payload is built once by ``chalicelib.dashboard.build_payload`` from tables seeded under an
in-process moto (20 running jobs, 16 replicas each, 60 snapshots per replica for the selected
job's charts). A small HTTP server on 127.0.0.1 then serves the page and that payload at
``/local/dashboard``, so the figure is the page's own cost, not moto's. Each run opens a new page
and takes ``performance.now()`` (milliseconds since navigation start) two animation frames after
the first render that drew all 320 replica dots of the job list and the selected job's 16 replica
nodes. Two modes: the payload from ``/dashboard/poll`` (the stream route answers 404, so the page
polls at once) and from ``/dashboard/stream`` (the page's first choice without a WebSocket).

Run: ``.venv/bin/python bench/dashboard_render.py [--runs 7]``
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from _harness import machine_line, use_test_stage

use_test_stage()

from moto import mock_aws

from chalicelib import aws, dashboard
from chalicelib.config import load_settings
from tandemn.resources import create_resources
from tests.dashboard_seed import seed_jobs
from tests.test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS

JOBS = 20
REPLICAS = 16


def build_payload() -> tuple[str, dict, float]:
    with mock_aws():
        aws.reset_clients()
        settings = load_settings()
        create_resources(aws.client("dynamodb"), aws.client("s3"), settings)
        ids = seed_jobs(settings, JOBS, REPLICAS, history=60)
        started = time.perf_counter()
        payload = dashboard.build_payload(settings, selected=ids[0])
        build_seconds = time.perf_counter() - started
    local = dataclasses.replace(settings, stage="local", websocket_url="")
    html, headers = dashboard.page(local)
    return html, {"headers": headers, "payload": payload}, build_seconds


def serve(html: str, page: dict, stream_enabled: dict) -> ThreadingHTTPServer:
    body_json = dashboard.encode(page["payload"]).encode()
    body_sse = dashboard.sse_body(page["payload"]).encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):
            return

        def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path == "/local/dashboard":
                self._send(200, html.encode(), page["headers"])
            elif path == "/local/dashboard/poll":
                self._send(200, body_json, {"Content-Type": "application/json"})
            elif path == "/local/dashboard/stream" and stream_enabled["on"]:
                self._send(200, body_sse, {"Content-Type": "text/event-stream"})
            else:
                self._send(404, b'{"message": "not found"}', {"Content-Type": "application/json"})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def measure(context, url: str, runs: int) -> list[float]:
    figures = []
    for _ in range(runs):
        page = context.new_page()
        page.goto(url)
        page.wait_for_function(
            f"() => document.querySelectorAll('#jobs .dot').length === {JOBS * REPLICAS}"
            f" && document.querySelectorAll('#replicas .node').length === {REPLICAS}"
            " && window.__dashboard.firstRenderAt !== null",
            timeout=30000,
        )
        figures.append(page.evaluate("window.__dashboard.firstRenderAt"))
        page.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="page loads per mode")
    arguments = parser.parse_args()
    if not CHROMIUM.exists():
        sys.exit("Chromium is not installed at /usr/bin/chromium; run `make chromium`")
    from playwright.sync_api import sync_playwright

    html, page_data, build_seconds = build_payload()
    size = len(dashboard.encode(page_data["payload"]))
    stream_enabled = {"on": False}
    server = serve(html, page_data, stream_enabled)
    url = f"http://127.0.0.1:{server.server_address[1]}/local/dashboard"
    results = {}
    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        measure(context, url, 1)  # warms Chromium's process and code caches
        results["/dashboard/poll"] = measure(context, url, arguments.runs)
        stream_enabled["on"] = True
        results["/dashboard/stream"] = measure(context, url, arguments.runs)
        context.close()
    server.shutdown()
    print(machine_line())
    print(
        f"payload: {JOBS} jobs x {REPLICAS} replicas, {size / 1024:.0f} KiB; "
        f"build_payload under in-process moto: {build_seconds:.2f} s"
    )
    for mode, figures in results.items():
        print(
            f"navigation to all nodes drawn, payload from {mode}: median "
            f"{statistics.median(figures):.0f} ms over {len(figures)} runs "
            f"(min {min(figures):.0f}, max {max(figures):.0f}; target under 1000 ms)"
        )


if __name__ == "__main__":
    main()
