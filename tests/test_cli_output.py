"""How the CLI lays out listings: a table where it fits, else one block of lines per row."""

from __future__ import annotations

import pytest
from rich.console import Console

from tandemn import cli_common

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
