"""Helpers shared by the CLI's command modules: the API client, error exits and JSON output."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console

from tandemn.api_client import ApiClient, ApiError, default_api_url

console = Console()
errors = Console(stderr=True)


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
