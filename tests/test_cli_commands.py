"""Every ``tandemn`` command against a local stack with the simulated engine: exit codes, output,
``--json`` and an error case that prints the API's message.

``add``, ``kill`` and ``swap`` succeeding are tested in tests/test_cli_lifecycle.py; this file
adds their error cases. The stack writes its pid file to a temporary directory
(``TANDEMN_LOCAL_STATE_DIR``), so it never replaces the pid file of a stack the user runs.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tandemn.api_client import ApiClient
from tandemn.cli import app
from tests import support
from tests.localstack_support import (
    PROJECT_DIR,
    StackProcess,
    processes_with_argument,
    wait_for_job,
)

pytestmark = pytest.mark.slow

runner = CliRunner()
UNREACHABLE = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("local-state")


@pytest.fixture(scope="module")
def stack(state_dir):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TANDEMN_LOCAL_STATE_DIR", str(state_dir))
        process = StackProcess(
            "--engine",
            "fake",
            "--watchdog-seconds",
            "1",
            "--lease-seconds",
            "10",
            log_path=PROJECT_DIR / "test-artifacts" / "cli-commands-stack.log",
        )
    try:
        process.wait_ready()
        yield process
    finally:
        assert process.stop() == 0


def invoke(stack, *arguments: str, input: str | None = None):
    return runner.invoke(
        app,
        [*arguments],
        env={"TANDEMN_API_URL": stack.url},
        input=input,
        catch_exceptions=False,
    )


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_input(path, count: int, max_tokens: int, prefix: str = "cmd") -> list[str]:
    ids = [f"{prefix}-{i:03d}" for i in range(count)]
    path.write_bytes(support.jsonl([support.request_line(i, max_tokens=max_tokens) for i in ids]))
    return ids


@pytest.fixture(scope="module")
def finished_job(stack, tmp_path_factory):
    """A job of 6 requests that ran to the end, submitted with `deploy --json --wait`."""
    path = tmp_path_factory.mktemp("finished") / "in.jsonl"
    ids = write_input(path, 6, max_tokens=10)
    result = invoke(
        stack, "deploy", "fake/model", str(path), "--chunk-size", "2", "--json", "--wait"
    )
    assert result.exit_code == 0, result.output
    lines = json_lines(result.stdout)
    return {"job_id": lines[0]["job_id"], "lines": lines, "ids": ids}


def start_long_job(stack, tmp_path, replicas: int = 1) -> str:
    """Submits a job that runs for minutes: 8 chunks of 2 requests of 5000 tokens each."""
    write_input(tmp_path / "long.jsonl", 16, max_tokens=5000, prefix="long")
    result = invoke(
        stack,
        "deploy",
        "fake/model",
        str(tmp_path / "long.jsonl"),
        "--chunk-size",
        "2",
        "--replicas",
        str(replicas),
        "--json",
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["job_id"]


def wait_running(client: ApiClient, job_id: str, replica_id: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        replicas = client.get(f"/job/{job_id}/replicas")["replicas"]
        if any(r["replica_id"] == replica_id and r["phase"] == "running" for r in replicas):
            return
        time.sleep(0.3)
    raise AssertionError(f"{replica_id} never ran: {replicas}")


# deploy


def test_deploy_wait_json_prints_one_object_per_line(finished_job):
    lines = finished_job["lines"]
    assert lines[0]["status"] == "queued"
    assert lines[0]["chunks"] == 3
    assert lines[-1]["status"] == "succeeded"
    assert lines[-1]["requests_succeeded"] == 6


def test_deploy_sends_placement_options(stack, tmp_path):
    write_input(tmp_path / "in.jsonl", 2, max_tokens=10)
    result = invoke(
        stack,
        "deploy",
        "fake/model",
        str(tmp_path / "in.jsonl"),
        "--gpu-type",
        "L4",
        "--tp",
        "2",
        "--pp",
        "1",
        "--on-demand",
        "--avg-output-tokens",
        "8",
        "--max-output-tokens",
        "10",
        "--slo",
        "2",
        "--description",
        "options test",
        "--user-id",
        "tester",
        "--json",
    )
    assert result.exit_code == 0, result.output

    job_id = json.loads(result.stdout)["job_id"]
    job = wait_for_job(ApiClient(stack.url), job_id, timeout=60)
    requested = job["requested"]
    assert requested["gpu_type"] == "L4"
    assert requested["tp_size"] == 2
    assert requested["pp_size"] == 1
    assert requested["on_demand"] is True
    assert requested["avg_output_tokens"] == 8
    assert requested["max_output_tokens"] == 10
    assert requested["slo_deadline_hours"] == 2.0
    assert job["description"] == "options test"
    assert job["user_id"] == "tester"


def test_deploy_bad_tp_prints_api_message(stack, tmp_path):
    write_input(tmp_path / "in.jsonl", 2, max_tokens=10)
    result = invoke(stack, "deploy", "fake/model", str(tmp_path / "in.jsonl"), "--tp", "3")
    assert result.exit_code == 1
    assert "HTTP 400" in result.output
    assert "tp_size" in result.output


def test_deploy_user_specified_without_gpu_prints_api_message(stack, tmp_path):
    write_input(tmp_path / "in.jsonl", 2, max_tokens=10)
    result = invoke(
        stack,
        "deploy",
        "Qwen/Qwen2.5-7B-Instruct",
        str(tmp_path / "in.jsonl"),
        "--placement-solver",
        "user_specified",
    )
    assert result.exit_code == 1
    assert "HTTP 400" in result.output
    assert "gpu_type" in result.output


def test_deploy_unreadable_architecture_file_exits_1(tmp_path):
    write_input(tmp_path / "in.jsonl", 2, max_tokens=10)
    (tmp_path / "arch.json").write_text("{not json")
    result = runner.invoke(
        app,
        [
            "deploy",
            "org/custom",
            str(tmp_path / "in.jsonl"),
            "--model-architecture",
            str(tmp_path / "arch.json"),
        ],
        env={"TANDEMN_API_URL": UNREACHABLE},
    )
    assert result.exit_code == 1
    assert "is not valid JSON" in result.output


def test_deploy_local_without_stack_explains(tmp_path):
    write_input(tmp_path / "in.jsonl", 2, max_tokens=10)
    result = runner.invoke(
        app,
        ["deploy", "fake/model", str(tmp_path / "in.jsonl"), "--local"],
        env={"TANDEMN_LOCAL_STATE_DIR": str(tmp_path / "no-stack")},
    )
    assert result.exit_code == 1
    assert "tandemn local up" in result.output


# plan


def test_plan_ranks_placements(stack, tmp_path):
    write_input(tmp_path / "in.jsonl", 4, max_tokens=100)
    path = str(tmp_path / "in.jsonl")
    table = invoke(stack, "plan", "Qwen/Qwen2.5-7B-Instruct", path, "--slo", "8", "--limit", "3")
    assert table.exit_code == 0, table.output
    assert "placements" in table.output
    assert "Qwen/Qwen2.5-7B-Instruct: 4 requests" in table.output

    result = invoke(
        stack,
        "plan",
        "Qwen/Qwen2.5-7B-Instruct",
        path,
        "--gpu-type",
        "L40S",
        "--on-demand",
        "--limit",
        "3",
        "--json",
    )
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert 0 < len(body["placements"]) <= 3
    assert {p["gpu_type"] for p in body["placements"]} == {"L40S"}
    assert {p["market"] for p in body["placements"]} == {"on_demand"}


def test_plan_bad_pp_prints_api_message(stack, tmp_path):
    write_input(tmp_path / "in.jsonl", 2, max_tokens=10)
    result = invoke(
        stack, "plan", "Qwen/Qwen2.5-7B-Instruct", str(tmp_path / "in.jsonl"), "--pp", "9"
    )
    assert result.exit_code == 1
    assert "HTTP 400" in result.output
    assert "pp_size" in result.output


# status and progress


def test_status_table_and_json(stack, finished_job):
    job_id = finished_job["job_id"]
    table = invoke(stack, "status", job_id)
    assert table.exit_code == 0, table.output
    assert "succeeded" in table.output
    assert "3 completed" in table.output

    detail = invoke(stack, "status", job_id, "--json")
    assert detail.exit_code == 0
    assert json.loads(detail.stdout)["requests_succeeded"] == 6

    listing = invoke(stack, "status", "--json", "--limit", "200")
    assert listing.exit_code == 0
    assert job_id in [job["job_id"] for job in json.loads(listing.stdout)["jobs"]]


def test_status_unknown_job_prints_404(stack):
    result = invoke(stack, "status", "no-such-job", "--json")
    assert result.exit_code == 1
    assert "HTTP 404" in result.output
    assert "no-such-job" in result.output
    assert result.stdout == ""


def test_progress_of_finished_job(stack, finished_job):
    job_id = finished_job["job_id"]
    bar = invoke(stack, "progress", job_id)
    assert bar.exit_code == 0, bar.output
    assert f"job {job_id} succeeded: 6 succeeded, 0 failed" in bar.output
    # Output that is not a terminal (a log file) gets one plain line per change.
    assert f"job {job_id} succeeded: 6/6 requests" in bar.output

    lines = invoke(stack, "progress", job_id, "--json")
    assert lines.exit_code == 0
    parsed = json_lines(lines.stdout)
    assert parsed[-1]["status"] == "succeeded"
    assert parsed[-1]["job_id"] == job_id


def test_progress_json_of_unknown_job_prints_404(stack):
    result = invoke(stack, "progress", "no-such-job", "--json")
    assert result.exit_code == 1
    assert "HTTP 404" in result.output


# metrics, stream and analytics


def test_metrics_table_and_json(stack, finished_job):
    job_id = finished_job["job_id"]
    table = invoke(stack, "metrics", job_id)
    assert table.exit_code == 0, table.output
    assert "output tokens/s" in table.output

    raw = invoke(stack, "metrics", job_id, "--json")
    assert raw.exit_code == 0
    assert "job" in json.loads(raw.stdout)

    watched = invoke(stack, "metrics", job_id, "--watch", "--json")
    assert watched.exit_code == 0
    lines = json_lines(watched.stdout)
    assert lines[-1]["job_status"] == "succeeded"


def test_metrics_of_unknown_replica_prints_404(stack, finished_job):
    result = invoke(stack, "metrics", finished_job["job_id"], "--replica", "no-such-replica")
    assert result.exit_code == 1
    assert "HTTP 404" in result.output


def test_stream_prints_until_job_ends(stack, finished_job):
    job_id = finished_job["job_id"]
    text = invoke(stack, "stream", job_id)
    assert text.exit_code == 0, text.output
    assert f"job {job_id} succeeded" in text.output

    lines = invoke(stack, "stream", job_id, "--json")
    assert lines.exit_code == 0
    assert all("avg_generation_throughput_toks_per_s" in line for line in json_lines(lines.stdout))


def test_stream_of_unknown_job_prints_404(stack):
    result = invoke(stack, "stream", "no-such-job")
    assert result.exit_code == 1
    assert "HTTP 404" in result.output


def test_history_lists_finished_run(stack, finished_job):
    job_id = finished_job["job_id"]
    listing = invoke(stack, "history", "--model", "fake", "--limit", "200", "--json")
    assert listing.exit_code == 0, listing.output
    runs = json.loads(listing.stdout)["runs"]
    assert job_id in [run["run_id"] for run in runs]

    table = invoke(stack, "history", "--limit", "5")
    assert table.exit_code == 0
    # The test terminal's 80 columns are too narrow for the table, so each run is a block
    # of lines that starts with its whole id.
    assert f"run {job_id}\n" in table.output
    assert "  cost USD: " in table.output


def test_history_without_stack_explains_how_to_start():
    result = runner.invoke(app, ["history"], env={"TANDEMN_API_URL": UNREACHABLE})
    assert result.exit_code == 1
    assert "tandemn local up" in result.output


def test_inspect_shows_report(stack, finished_job):
    job_id = finished_job["job_id"]
    table = invoke(stack, "inspect", job_id, "--replicas")
    assert table.exit_code == 0, table.output
    assert "6 succeeded, 0 failed" in table.output
    assert "replica" in table.output

    raw = invoke(stack, "inspect", job_id, "--json")
    assert raw.exit_code == 0
    report = json.loads(raw.stdout)
    assert report["requests"]["succeeded"] == 6
    assert "replicas" not in report
    with_replicas = invoke(stack, "inspect", job_id, "--replicas", "--json")
    replica_ids = [entry["replica_id"] for entry in json.loads(with_replicas.stdout)["replicas"]]
    assert replica_ids == [f"{job_id}-r0"]


def test_inspect_unknown_run_prints_404(stack):
    result = invoke(stack, "inspect", "no-such-run")
    assert result.exit_code == 1
    assert "HTTP 404" in result.output


def test_timeseries_table_and_json(stack, finished_job):
    job_id = finished_job["job_id"]
    raw = invoke(stack, "timeseries", job_id, "--step", "1", "--json")
    assert raw.exit_code == 0, raw.output
    body = json.loads(raw.stdout)
    assert "aggregated" in body
    assert "timeseries" in body

    table = invoke(stack, "timeseries", job_id, "--replica", f"{job_id}-r0")
    assert table.exit_code == 0
    assert f"replica {job_id}-r0" in table.output


def test_timeseries_bad_replica_id_exits_2(stack, finished_job):
    # The CLI rejects the id before any request, as a usage error.
    result = invoke(stack, "timeseries", finished_job["job_id"], "--replica", "Bad_Id")
    assert result.exit_code == 2
    assert "'Bad_Id' is not a valid id" in result.output


@pytest.mark.parametrize("job_id", ["../../etc/passwd", "%00", "x'; DROP", "a/b"])
def test_status_invalid_job_id_exits_2(stack, job_id):
    result = invoke(stack, "status", job_id)
    assert result.exit_code == 2
    assert "is not a valid id" in result.output


# download


def test_download_json_writes_both_files(stack, finished_job, tmp_path):
    destination = tmp_path / "result" / "output.jsonl"
    result = invoke(stack, "download", finished_job["job_id"], "-o", str(destination), "--json")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["output"] == str(destination)
    assert body["output_bytes"] == destination.stat().st_size
    assert body["errors_bytes"] == 0
    records = [json.loads(line) for line in destination.read_text().splitlines()]
    assert [record["custom_id"] for record in records] == finished_job["ids"]


def test_download_into_folder_and_named_file(stack, finished_job, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    into_folder = invoke(stack, "download", finished_job["job_id"], "-o", str(folder), "--json")
    assert into_folder.exit_code == 0, into_folder.output
    body = json.loads(into_folder.stdout)
    assert body["output"] == str(folder / "output.jsonl")
    assert body["errors"] == str(folder / "errors.jsonl")

    # A named output file gets its own errors file, so it overwrites nothing of the first.
    named = folder / "second.jsonl"
    second = invoke(stack, "download", finished_job["job_id"], "-o", str(named), "--json")
    assert second.exit_code == 0, second.output
    assert json.loads(second.stdout)["errors"] == str(folder / "second.errors.jsonl")
    assert sorted(path.name for path in folder.iterdir()) == [
        "errors.jsonl",
        "output.jsonl",
        "second.errors.jsonl",
        "second.jsonl",
    ]


def test_download_unwritable_path_prints_error(stack, finished_job, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = invoke(stack, "download", finished_job["job_id"], "-o", str(blocker / "o.jsonl"))
    assert result.exit_code == 1
    assert f"cannot write {blocker / 'o.jsonl'}" in result.output
    assert "choose another path with -o" in result.output
    assert "Traceback" not in result.output


def test_download_unknown_job_prints_404(stack, tmp_path):
    result = invoke(stack, "download", "no-such-job", "-o", str(tmp_path / "o.jsonl"))
    assert result.exit_code == 1
    assert "HTTP 404" in result.output


# add, kill, swap and replicas: error cases


def test_replica_commands_print_api_errors(stack, tmp_path):
    job_id = start_long_job(stack, tmp_path)

    listed = invoke(stack, "replicas", job_id, "--json")
    assert listed.exit_code == 0, listed.output
    assert [r["replica_id"] for r in json.loads(listed.stdout)["replicas"]] == [f"{job_id}-r0"]

    added = invoke(stack, "add", "no-such-job")
    assert added.exit_code == 1
    assert "HTTP 404" in added.output

    killed = invoke(stack, "kill", job_id, f"{job_id}-r9")
    assert killed.exit_code == 1
    assert f"skipped {job_id}-r9: not a replica of job {job_id}" in killed.output

    no_swap = invoke(stack, "swap", job_id, "--cancel")
    assert no_swap.exit_code == 1
    assert "HTTP 409" in no_swap.output
    assert "no swap in progress" in no_swap.output

    bad_swap = invoke(stack, "swap", job_id, "--tp", "5")
    assert bad_swap.exit_code == 1
    assert "HTTP 400" in bad_swap.output
    assert "tp_size" in bad_swap.output

    assert invoke(stack, "destroy", job_id).exit_code == 0


# destroy


def test_destroy_job_stops_replicas(stack, tmp_path):
    job_id = start_long_job(stack, tmp_path)
    replica_id = f"{job_id}-r0"
    client = ApiClient(stack.url)
    wait_running(client, job_id, replica_id)

    result = invoke(stack, "destroy", job_id, "--reason", "test run")
    assert result.exit_code == 0, result.output
    assert f"job {job_id} cancelled" in result.output
    assert f"replicas stopped: {replica_id}" in result.output
    assert processes_with_argument(f"--replica-id {replica_id}") == []
    job = client.get(f"/job/{job_id}")
    assert job["status"] == "cancelled"
    assert job["cancel_reason"] == "test run"

    again = invoke(stack, "destroy", job_id, "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["already_cancelled"] is True

    # The teardown assembles the partial output, with every request in one of the two files.
    deadline = time.monotonic() + 60
    while not client.get(f"/job/{job_id}").get("output_file"):
        assert time.monotonic() < deadline, "the cancelled job's output was not assembled"
        time.sleep(0.5)
    destination = tmp_path / "o.jsonl"
    download = invoke(stack, "download", job_id, "-o", str(destination), "--json")
    assert download.exit_code == 0, download.output
    written = json.loads(download.stdout)
    records = [json.loads(line) for line in destination.read_text().splitlines()]
    errors = [json.loads(line) for line in Path(written["errors"]).read_text().splitlines()]
    assert len(records) + len(errors) == 16
    assert {error["error"]["code"] for error in errors} == {"batch_cancelled"}


def test_destroy_finished_job_prints_409(stack, finished_job):
    result = invoke(stack, "destroy", finished_job["job_id"])
    assert result.exit_code == 1
    assert "HTTP 409" in result.output
    assert "already ended as 'succeeded'" in result.output


def test_destroy_unknown_job_prints_404(stack):
    result = invoke(stack, "destroy", "no-such-job")
    assert result.exit_code == 1
    assert "HTTP 404" in result.output


@pytest.mark.parametrize("arguments", [[], ["some-job", "--all"]])
def test_destroy_needs_job_or_all(arguments):
    result = runner.invoke(app, ["destroy", *arguments], env={"TANDEMN_API_URL": UNREACHABLE})
    assert result.exit_code == 2
    assert "give one JOB to cancel, or --all" in result.output


def test_destroy_all_asks_then_cancels_active_jobs(stack, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = start_long_job(stack, tmp_path / "a")
    second = start_long_job(stack, tmp_path / "b")

    declined = invoke(stack, "destroy", "--all", input="n\n")
    assert declined.exit_code == 1
    assert first in declined.output
    assert second in declined.output
    client = ApiClient(stack.url)
    assert client.get(f"/job/{first}")["status"] != "cancelled"

    result = invoke(stack, "destroy", "--all", "--yes", "--json")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    cancelled = {entry["job_id"] for entry in body["cancelled"]}
    assert {first, second} <= cancelled
    assert body["failed"] == []
    for job_id in (first, second):
        assert client.get(f"/job/{job_id}")["status"] == "cancelled"

    nothing = invoke(stack, "destroy", "--all", "--yes")
    assert nothing.exit_code == 0
    assert "no active job to cancel" in nothing.output


# local up and down


def test_local_up_deploy_local_and_down(tmp_path):
    environment = {"TANDEMN_LOCAL_STATE_DIR": str(tmp_path / "state")}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TANDEMN_LOCAL_STATE_DIR", environment["TANDEMN_LOCAL_STATE_DIR"])
        process = StackProcess(
            "--engine",
            "fake",
            "--watchdog-seconds",
            "1",
            log_path=PROJECT_DIR / "test-artifacts" / "cli-up-down-stack.log",
        )
    # `local down` waits for the stack's pid to disappear, so its exit status is collected here.
    reaper = threading.Thread(target=process.process.wait, daemon=True)
    try:
        process.wait_ready()
        reaper.start()
        pid_file = tmp_path / "state" / "stack.pid"
        assert pid_file.read_text() == str(process.process.pid)

        # A second stack on the same state folder would replace the first one's files.
        second = runner.invoke(app, ["local", "up", "--engine", "fake"], env=environment)
        assert second.exit_code == 1
        assert f"a local stack is already running (pid {process.process.pid}" in second.output
        assert pid_file.read_text() == str(process.process.pid)

        write_input(tmp_path / "in.jsonl", 2, max_tokens=10)
        deployed = runner.invoke(
            app,
            ["deploy", "fake/model", str(tmp_path / "in.jsonl"), "--local", "--json", "--wait"],
            env={**environment, "TANDEMN_API_URL": UNREACHABLE},
            catch_exceptions=False,
        )
        assert deployed.exit_code == 0, deployed.output
        assert json_lines(deployed.stdout)[-1]["status"] == "succeeded"

        down = runner.invoke(app, ["local", "down"], env=environment, catch_exceptions=False)
        assert down.exit_code == 0, down.output
        assert "local stack stopped" in down.output
        reaper.join(timeout=60)
        assert process.process.returncode == 0
        assert not pid_file.exists()
        assert not (tmp_path / "state" / "stack.json").exists()

        again = runner.invoke(app, ["local", "down"], env=environment, catch_exceptions=False)
        assert again.exit_code == 0
        assert "no local stack is running" in again.output
    finally:
        process.stop()


def test_local_up_unknown_engine_exits_1(tmp_path):
    result = runner.invoke(
        app,
        ["local", "up", "--engine", "vllm"],
        env={"TANDEMN_LOCAL_STATE_DIR": str(tmp_path)},
    )
    assert result.exit_code == 1
    assert "--engine 'vllm' is not known" in result.output


# help texts


def _commands(group, prefix: tuple[str, ...] = ()):
    # Typer 0.29 ships its own copy of click, so groups and options are recognised by their
    # attributes rather than by click's classes.
    for name, command in sorted(group.commands.items()):
        path = (*prefix, name)
        if hasattr(command, "commands"):
            yield from _commands(command, path)
        else:
            yield path, command


ALL_COMMANDS = list(_commands(typer.main.get_command(app)))
# Options named with one of these words (a time or a number of tokens) state the unit in their
# help.
UNIT_WORDS = {
    "seconds": "second",
    "timeout": "second",
    "interval": "second",
    "step": "second",
    "start": "second",
    "end": "second",
    "slo": "hour",
    "tokens": "token",
}


@pytest.mark.parametrize("path", [path for path, _ in ALL_COMMANDS], ids=" ".join)
def test_every_option_has_help(path):
    command = dict(ALL_COMMANDS)[path]
    assert command.help, f"`tandemn {' '.join(path)}` has no description"
    for parameter in command.params:
        help_text = getattr(parameter, "help", None)
        assert help_text, f"`tandemn {' '.join(path)}` {parameter.name} has no help text"
        if parameter.param_type_name == "option" and not parameter.is_flag:
            for word, unit in UNIT_WORDS.items():
                if word in parameter.name.split("_"):
                    assert unit in help_text.lower(), (
                        f"`tandemn {' '.join(path)}` {parameter.opts[0]} does not state its "
                        f"unit ({unit}s): {help_text!r}"
                    )

    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for parameter in command.params:
        if parameter.param_type_name == "option":
            assert parameter.opts[0] in result.output


def test_help_lists_every_required_command():
    names = {" ".join(path) for path, _ in ALL_COMMANDS}
    required = {
        "deploy",
        "plan",
        "status",
        "progress",
        "metrics",
        "stream",
        "add",
        "kill",
        "swap",
        "replicas",
        "history",
        "inspect",
        "timeseries",
        "download",
        "destroy",
        "local up",
        "local down",
    }
    assert required <= names, sorted(required - names)
