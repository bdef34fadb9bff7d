"""Helpers shared by the CLI's command modules: the API client, error exits and JSON output."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from tandemn.api_client import ApiClient, ApiError, default_api_url

console = Console()
errors = Console(stderr=True)


def print_listing(headers: list[str], rows: list[list[str]]) -> None:
    """Prints rows as a table when it fits the terminal, else as one block of lines per row.

    The first column contains ids that users copy into the next command, and a table squeezed
    into a narrow terminal cuts ids short and splits numbers across lines. Each block starts
    with the row's id and lists the other columns as ``header: value``.
    """
    table = Table(*headers)
    for row in rows:
        table.add_row(*row)
    # The measurement is capped at the width it is given, so give it room to find the natural one.
    natural = Measurement.get(console, console.options.update(max_width=100_000), table).maximum
    if natural <= console.width:
        console.print(table)
        return
    for row in rows:
        console.print(f"{headers[0]} {row[0]}", highlight=False, markup=False, soft_wrap=True)
        for header, value in zip(headers[1:], row[1:], strict=True):
            console.print(f"  {header}: {value}", highlight=False, markup=False, soft_wrap=True)


def _client(api_url: str | None) -> ApiClient:
    return ApiClient(api_url or default_api_url())


def _fail(message: str, code: int = 1) -> None:
    errors.print(f"[red]error:[/red] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def _call(function, *args: Any, **kwargs: Any) -> Any:
    """Calls the API; an API error prints its message and exits 1."""
    try:
        return function(*args, **kwargs)
    except ApiError as error:
        _fail(str(error))


def _print_json(data: Any) -> None:
    """Prints one JSON document on stdout, with no colour, markup or line wrapping."""
    typer.echo(json.dumps(data, indent=2, default=str))


def _print_json_line(data: Any) -> None:
    """Prints one JSON object on one line, for commands that print a stream of them."""
    typer.echo(json.dumps(data, default=str))
