"""The dashboard page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright)
against the local stack while a job runs: live updates without a reload, and the fallback from
a cut WebSocket to server-sent events or polling."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tandemn.api_client import ApiClient
from tests import support
from tests.localstack_support import PROJECT_DIR, StackProcess, llama_stack

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = PROJECT_DIR / "out" / "test-artifacts"
# Without the background-networking flags Chromium keeps trying to reach Google's hosts, which
# a closed network refuses.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TERMINAL = ("succeeded", "completed_with_errors", "failed", "cancelled")


@pytest.fixture
def browser_page(tmp_path):
    if not CHROMIUM.exists():
        pytest.fail("Chromium is not installed at /usr/bin/chromium; `make test` installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on(
                "console",
                lambda message: errors.append(message.text) if message.type == "error" else None,
            )
            yield page, errors
        finally:
            context.close()


def submit(stack: StackProcess, tmp_path: Path, count: int, max_tokens: int, **options) -> str:
    lines = [
        support.request_line(
            f"web-{i:03d}", content="Tell a short story about a lighthouse.", max_tokens=max_tokens
        )
        for i in range(count)
    ]
    (tmp_path / "in.jsonl").write_bytes(support.jsonl(lines))
    client = ApiClient(stack.url)
    uri = client.upload(tmp_path / "in.jsonl")
    submitted = client.post(
        "/submit/batch",
        {"model_name": "HuggingFaceTB/SmolLM2-135M-Instruct", "input_file": uri, **options},
    )
    return submitted["job_id"]


def dashboard_state(page) -> dict:
    return page.evaluate(
        """() => {
          const s = window.__dashboard;
          const job = s.payload && s.payload.jobs.find(j => j.job_id === s.selected);
          const canvas = document.getElementById('chart-throughput');
          return {
            transport: s.transport,
            renders: s.renders,
            selected: s.selected,
            status: job ? job.status : null,
            progress: job ? job.progress : null,
            requestsDone: job ? job.requests_done : null,
            phases: [...document.querySelectorAll('#replicas .node')].map(n => n.dataset.phase),
            chartPoints: canvas ? Number(canvas.dataset.points || 0) : 0,
            chartLast: canvas ? canvas.dataset.last : '',
          };
        }"""
    )


def wait_for(page, predicate, timeout: float, expected: str) -> dict:
    deadline = time.monotonic() + timeout
    state = dashboard_state(page)
    while time.monotonic() < deadline:
        state = dashboard_state(page)
        if predicate(state):
            return state
        page.wait_for_timeout(500)
    raise AssertionError(f"the page never showed {expected}; last state {state}")


@pytest.mark.slow
def test_page_updates_live_while_a_llama_job_runs(browser_page, tmp_path, monkeypatch):
    page, errors = browser_page
    # The local provider passes its environment to each sidecar: snapshots every 2 s.
    monkeypatch.setenv("TANDEMN_METRICS_INTERVAL", "2")
    stack = llama_stack(PROJECT_DIR / "test-artifacts" / "dashboard-llama-stack.log")
    try:
        stack.wait_ready()
        job_id = submit(stack, tmp_path, 24, 64, replicas=2, chunk_size=2)
        navigations: list[str] = []
        page.on(
            "framenavigated",
            lambda frame: navigations.append(frame.url) if frame == page.main_frame else None,
        )
        page.goto(f"{stack.url}/dashboard#job={job_id}")

        first = wait_for(
            page, lambda s: s["selected"] == job_id and s["phases"], 120, "the job's replicas"
        )
        running = wait_for(
            page,
            lambda s: (
                "running" in s["phases"] and s["chartPoints"] > 0 and (s["progress"] or 0) > 0
            ),
            240,
            "a running replica, a chart point and progress",
        )
        later = wait_for(
            page,
            lambda s: (
                s["renders"] > running["renders"]
                and (s["progress"] > running["progress"] or s["status"] in TERMINAL)
                and s["chartLast"] != running["chartLast"]
            ),
            240,
            "more progress and a new chart point",
        )
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-llama.png"), full_page=True)

        assert len(navigations) == 1, f"the page reloaded: {navigations}"
        assert later["transport"] in ("sse", "poll")
        assert first["renders"] < later["renders"]
        assert errors == []
    finally:
        # The page would go on requesting while the stack stops.
        page.goto("about:blank")
        assert stack.stop() == 0


@pytest.fixture
def fake_stack(monkeypatch):
    # Nothing listens on port 9, so only the page's WebSocket route below accepts this URL.
    monkeypatch.setenv("TANDEMN_WEBSOCKET_URL", "ws://127.0.0.1:9/live")
    stack = StackProcess(
        "--engine",
        "fake",
        "--watchdog-seconds",
        "1",
        log_path=PROJECT_DIR / "test-artifacts" / "dashboard-fake-stack.log",
    )
    try:
        stack.wait_ready()
        yield stack
    finally:
        assert stack.stop() == 0


def test_page_falls_back_from_a_cut_websocket(fake_stack, browser_page, tmp_path):
    page, errors = browser_page
    job_id = submit(fake_stack, tmp_path, 64, 1000, replicas=1, chunk_size=4)
    sockets = []
    subscriptions: list[dict] = []
    cut = {"now": False}

    def on_websocket(route):
        if cut["now"]:
            route.close()
            return
        sockets.append(route)
        route.on_message(lambda message: subscriptions.append(json.loads(message)))

    page.route_web_socket("ws://127.0.0.1:9/live**", on_websocket)
    requests: list[tuple[float, str]] = []
    page.on("request", lambda request: requests.append((time.monotonic(), request.url)))

    page.goto(f"{fake_stack.url}/dashboard#job={job_id}")
    wait_for(
        page,
        lambda s: s["transport"] == "websocket" and s["selected"] == job_id,
        60,
        "a WebSocket connection",
    )
    wait_for(
        page, lambda s: any(m.get("job_id") == job_id for m in subscriptions), 30, "a subscription"
    )
    assert subscriptions[0]["action"] == "subscribe"
    # A pushed snapshot reaches the page without a poll in between.
    sockets[0].send(
        json.dumps(
            {"type": "metrics", "job_id": job_id, "snapshot": {"num_requests_waiting": 4242}}
        )
    )
    page.wait_for_function(
        f"() => window.__dashboard.payload.metrics['{job_id}'].num_requests_waiting === 4242"
    )
    assert not any("/dashboard/stream" in url for _, url in requests)

    cut["now"] = True
    cut_at = time.monotonic()
    sockets[0].close()
    fallen = wait_for(page, lambda s: s["transport"] in ("sse", "poll"), 30, "a fallback transport")
    after = wait_for(
        page,
        lambda s: (
            s["renders"] > fallen["renders"] + 2
            and (
                (s["requestsDone"] or 0) > (fallen["requestsDone"] or 0) or s["status"] in TERMINAL
            )
        ),
        120,
        "updates after the fallback",
    )

    fallback_requests = [
        url
        for at, url in requests
        if at > cut_at and ("/dashboard/stream" in url or "/dashboard/poll" in url)
    ]
    assert len(fallback_requests) >= 2, fallback_requests
    assert after["transport"] in ("sse", "poll")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-fallback.png"), full_page=True)
    assert errors == []
