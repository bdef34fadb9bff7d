"""Helpers shared by the CLI's command modules: the API client, error exits and JSON output."""

from __future__ import annotations

import json
import math
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Column, Table

from tandemn.api_client import ApiClient, ApiError, default_api_url

console = Console()
errors = Console(stderr=True)

TERMINAL_STATUSES = {"succeeded", "completed_with_errors", "failed", "cancelled"}

# Options that several commands take.
ApiUrl = typer.Option(
    None,
    "--api-url",
    help="Control-plane URL (default: $TANDEMN_API_URL, else the running `tandemn local up` "
    "stack, else http://127.0.0.1:26336).",
)
JsonFlag = typer.Option(False, "--json", help="Print the API's JSON instead of a table.")
# The API checks the placement options' values and names the allowed ones in its error.
GpuType = typer.Option(
    None, "--gpu-type", help="GPU type to run on, e.g. L4, L40S, A100, H100, H200, B200."
)
TpSize = typer.Option(
    None, "--tp", help="Tensor parallel size: GPUs that share each model layer (1, 2, 4 or 8)."
)
PpSize = typer.Option(
    None, "--pp", help="Pipeline parallel size: GPUs the layers are split across (1 to 4)."
)


def valid_id(value: str | list[str] | None) -> str | list[str] | None:
    """Rejects a job, run or replica id that the API could not have issued, before it is put in
    a URL path where a "/", "%" or ";" would change which route the request reaches."""
    from chalicelib.models import ID_RE  # pydantic loads only for commands that take an id

    for item in value if isinstance(value, list) else [value]:
        if item is not None and not ID_RE.match(item):
            raise typer.BadParameter(
                f"{item!r} is not a valid id; ids are 1 to 80 lowercase letters, digits and "
                "hyphens, starting with a letter or digit, as `tandemn status` lists them"
            )
    return value


def number_in(low: float | None, high: float | None = None):
    """Returns an option callback that accepts a finite number within [low, high].

    Click's own range check lets nan through with a misleading message and inf reaches the API,
    which JSON cannot encode, so this callback checks both before the range.
    """

    def check(value: float | None) -> float | None:
        if value is None:
            return value
        if not math.isfinite(value):
            raise typer.BadParameter(f"{value} is not a finite number; give a number such as 4")
        if low is not None and value < low:
            raise typer.BadParameter(f"{value} is below the minimum {low:g}; give {low:g} or more")
        if high is not None and value > high:
            raise typer.BadParameter(f"{value} is above the maximum {high:g}; give {high:g} or less")
        return value

    return check


def key_value_table(title: str | None = None) -> Table:
    """Returns a two-column table of labels and values whose long values wrap, not end in '…'."""
    return Table(
        Column(no_wrap=True), Column(overflow="fold"), show_header=False, title=title
    )


def print_listing(headers: list[str], rows: list[list[str]], title: str | None = None) -> None:
    """Prints rows as a table when it fits the terminal, else as one block of lines per row.

    The first column contains ids that users copy into the next command, and a table squeezed
    into a narrow terminal cuts ids short and splits numbers across lines. Each block starts
    with the row's id and lists the other columns as ``header: value``.
    """
    table = Table(*headers, title=title)
    for row in rows:
        table.add_row(*row)
    # The measurement is capped at the width it is given, so give it room to find the natural one.
    natural = Measurement.get(console, console.options.update(max_width=100_000), table).maximum
    if natural <= console.width:
        console.print(table)
        return
    if title:
        console.print(title, highlight=False, markup=False, soft_wrap=True)
    for row in rows:
        console.print(f"{headers[0]} {row[0]}", highlight=False, markup=False, soft_wrap=True)
        for header, value in zip(headers[1:], row[1:], strict=True):
            console.print(f"  {header}: {value}", highlight=False, markup=False, soft_wrap=True)


def _client(api_url: str | None) -> ApiClient:
    return ApiClient(api_url or default_api_url())


def _fail(message: str, code: int = 1) -> None:
    # The message is escaped, so brackets from the API (a JSON path such as body[0]) stay text.
    errors.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


# The API's messages name its JSON fields; the CLI user sets the same things with options.
CLI_WORDS = (
    ("send force: true", "pass --force"),
    ("pass force: true", "pass --force"),
    ("pass its architecture as model_architecture", "pass its config.json with --model-architecture"),
    ("choose another gpu_type, tp_size or pp_size", "choose another --gpu-type, --tp or --pp"),
    ("change gpu_type, tp_size, pp_size or num_replicas", "change --gpu-type, --tp, --pp or --replicas"),
    ("add replicas with scale", "add replicas with `tandemn add`"),
    ("listed in 'errors'", "listed below"),
    ("use a smaller chunk_size", "use a smaller --chunk-size"),
)


def cli_words(message: str) -> str:
    """Rewrites an API error message in the words of the CLI's options."""
    for api_words, cli_text in CLI_WORDS:
        message = message.replace(api_words, cli_text)
    return message


def _call(function, *args: Any, local_names: dict[str, str] | None = None, **kwargs: Any) -> Any:
    """Calls the API; an API error prints its message and exits 1.

    ``local_names`` maps names in the API's message to the user's own, such as the s3:// URI of
    an uploaded file to the local path it came from.
    """
    try:
        return function(*args, **kwargs)
    except ApiError as error:
        message = cli_words(str(error))
        for api_name, local_name in (local_names or {}).items():
            message = message.replace(api_name, local_name)
        _fail(message)


def _print_json(data: Any) -> None:
    """Prints one JSON document on stdout, with no colour, markup or line wrapping."""
    typer.echo(json.dumps(data, indent=2, default=str))


def _print_json_line(data: Any) -> None:
    """Prints one JSON object on one line, for commands that print a stream of them."""
    typer.echo(json.dumps(data, default=str))
