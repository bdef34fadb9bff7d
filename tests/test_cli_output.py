"""How the CLI prints: listings as a table where it fits, else one block per row, and API errors."""

from __future__ import annotations

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from tandemn import cli_common
from tandemn.api_client import ApiError
from tandemn.cli import app

HEADERS = ["job", "status", "output tokens"]
ROWS = [["smollm2-135m-instruct-8459e983", "completed_with_errors", "1234567"]]


@pytest.fixture
def screen(monkeypatch):
    def render(width: int) -> str:
        console = Console(width=width, record=True, color_system=None)
        monkeypatch.setattr(cli_common, "console", console)
        cli_common.print_listing(HEADERS, ROWS)
        return console.export_text()

    return render


def test_listing_wide_terminal_prints_table(screen):
    text = screen(120)
    assert "┃ job" in text
    assert "smollm2-135m-instruct-8459e983 │ completed_with_errors │ 1234567" in text


def test_listing_narrow_terminal_prints_blocks(screen):
    lines = screen(40).splitlines()
    assert lines == [
        "job smollm2-135m-instruct-8459e983",
        "  status: completed_with_errors",
        "  output tokens: 1234567",
    ]


def test_api_error_in_cli_words(monkeypatch, capsys):
    console = Console(stderr=True, width=200, color_system=None)
    monkeypatch.setattr(cli_common, "errors", console)

    def infeasible():
        raise ApiError(
            "HTTP 409: the requested placement L4 tp_size 1 pp_size 1 is infeasible; choose "
            "another gpu_type, tp_size or pp_size, or pass force: true to submit anyway; see "
            "body[messages]",
            409,
        )

    with pytest.raises(typer.Exit):
        cli_common._call(infeasible)
    printed = capsys.readouterr().err
    assert "choose another --gpu-type, --tp or --pp, or pass --force to submit anyway" in printed
    # Brackets from the API are printed as text, not read as console markup.
    assert "body[messages]" in printed


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("inf", "inf is not a finite number"),
        ("nan", "nan is not a finite number"),
        ("721", "721.0 is above the maximum 720"),
        ("0", "0.0 is below the minimum 0.01"),
    ],
)
def test_slo_option_rejects_value(value, message):
    result = CliRunner().invoke(
        app, ["plan", "some/model", "in.jsonl", "--slo", value], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 2
    assert message in result.output


def test_key_value_table_wraps_long_values():
    console = Console(width=40, record=True, color_system=None)
    table = cli_common.key_value_table()
    table.add_row("output", "s3://tandemn-local/jobs/a-long-job-id-12345678/output.jsonl")
    console.print(table)
    text = "".join(line.strip("│ ") for line in console.export_text().splitlines())
    assert "…" not in text
    assert "a-long-job-id-12345678/output.jsonl" in text.replace(" ", "")


def test_interrupted_follow_prints_job_still_runs(monkeypatch, capsys):
    from tandemn import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_follow", interrupted)
    monkeypatch.setattr(cli, "errors", Console(stderr=True, width=200, color_system=None))
    with pytest.raises(typer.Exit) as stopped:
        cli._follow_command(None, "job-1")
    assert stopped.value.exit_code == 130
    printed = capsys.readouterr().err
    assert "stopped following job job-1; the job keeps running" in printed
    assert "`tandemn destroy job-1` cancels it" in printed

