"""``make demo``: the main job end to end on this machine with the real engine.

Starts the local stack (``tandemn local up``, its log in ``.cache/local/logs/demo-stack.log``)
with 2 replicas of llama.cpp serving SmolLM2-135M-Instruct, submits the 30 example prompts with
output capped at 128 tokens, shows progress, writes ``out/demo/output.jsonl``, prints a summary
and stops the stack, also when something fails or the user presses Ctrl-C.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console

from tandemn import engine_paths
from tandemn.api_client import ApiClient, ApiError
from tandemn.cli import _follow
from tandemn.stack_process import PROJECT_DIR, StackProcess

DEMO_INPUT = PROJECT_DIR / "examples" / "demo_batch.jsonl"
DEMO_OUTPUT = PROJECT_DIR / "out" / "demo" / "output.jsonl"
STACK_LOG = PROJECT_DIR / ".cache" / "local" / "logs" / "demo-stack.log"
MODEL_NAME = engine_paths.SERVED_MODEL_NAME

console = Console()


def _summary(job: dict, output: Path, wall_seconds: float) -> list[str]:
    records = [json.loads(line) for line in output.read_text().splitlines() if line.strip()]
    completion_tokens = sum(
        ((r.get("response") or {}).get("body") or {}).get("usage", {}).get("completion_tokens", 0)
        for r in records
    )
    return [
        f"requests succeeded: {job.get('requests_succeeded')}",
        f"requests failed:    {job.get('requests_failed')}",
        f"output tokens:      {completion_tokens}",
        f"tokens per second:  {completion_tokens / wall_seconds:.1f} (output tokens / wall time)",
        f"wall time:          {wall_seconds:.1f} s (stack start to output downloaded)",
        f"output:             {output}",
        f"stack log:          {STACK_LOG}",
    ]


def run(port: int = 26336, replicas: int = 2) -> int:
    # TANDEMN_DEMO_ENGINE=fake runs the simulated engine (used by the tests of the demo itself).
    engine = "fake" if os.environ.get("TANDEMN_DEMO_ENGINE") == "fake" else "llama"
    if engine == "llama":
        engine_paths.find_engine()
    port = int(os.environ.get("TANDEMN_DEMO_PORT", port))
    output = Path(os.environ.get("TANDEMN_DEMO_OUTPUT", DEMO_OUTPUT))
    started = time.monotonic()
    stack = StackProcess(
        "--engine", engine, "--watchdog-seconds", "5", log_path=STACK_LOG, port=port
    )
    try:
        stack.wait_ready(timeout=120)
        client = ApiClient(stack.url)
        console.print(f"local stack up at {stack.url}; submitting {DEMO_INPUT.name}")
        uri = client.upload(DEMO_INPUT)
        submitted = client.post(
            "/submit/batch",
            {
                "model_name": MODEL_NAME,
                "input_file": uri,
                "replicas": replicas,
                "chunk_size": 5,
                "max_output_tokens": 128,
            },
        )
        console.print(
            f"job {submitted['job_id']}: {submitted['chunks']} chunks on replicas "
            f"{', '.join(submitted['replicas'])}"
        )
        job = _follow(client, submitted["job_id"])
        if job["status"] not in ("succeeded", "completed_with_errors"):
            console.print(f"[red]job ended {job['status']}[/red]; see {STACK_LOG}")
            return 1
        links = client.get(f"/job/{job['job_id']}/output")
        client.download(links["output_url"], output)
        client.download(links["error_url"], output.with_name("errors.jsonl"))
        wall = time.monotonic() - started
        for line in _summary(job, output, wall):
            console.print(line, highlight=False)
        return 0 if job["status"] == "succeeded" else 1
    finally:
        code = stack.stop()
        if code != 0:
            console.print(f"[red]the local stack exited with code {code}[/red]; see {STACK_LOG}")


def main() -> None:
    try:
        code = run()
    except (ApiError, FileNotFoundError, RuntimeError, TimeoutError) as error:
        console.print(f"[red]demo failed:[/red] {error}")
        code = 1
    except KeyboardInterrupt:
        console.print("demo interrupted; the local stack was stopped")
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
