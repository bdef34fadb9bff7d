"""Validate an OpenAI batch JSONL input in one streaming pass and split it into chunks.

The input is read in blocks of ``READ_BLOCK_BYTES`` and split into lines here, so memory stays
bounded for a 2 GiB file. The buffers contain one block, the start of at most one line of
``MAX_LINE_BYTES`` and their split copies, a few MiB in all. A longer line is skipped up to its
newline without being held whole. The custom_id index adds about 130 bytes per request, so
about 130 MB at ``MAX_REQUESTS``.

Each chunk is a byte range of the object, so replicas read their requests with a ranged GET
and nothing is copied.

Line numbers are 1-based physical lines. Whitespace-only lines count for line numbers but are
not requests.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any, Protocol

MAX_LINE_BYTES = 1_000_000  # per line, excluding the newline
MAX_REQUESTS = 1_000_000
MAX_FILE_BYTES = 2 * 1024**3
MAX_REPORTED_ERRORS = 20
# Each chunk becomes one queue item, so the job's item count stays bounded.
MAX_CHUNKS = 100_000
SUPPORTED_URLS = ("/v1/chat/completions", "/v1/completions")

READ_BLOCK_BYTES = 1024 * 1024
UTF8_BOM = b"\xef\xbb\xbf"

CHAT_URL, COMPLETIONS_URL = SUPPORTED_URLS
# Field values quoted in error messages are cut to about this many characters.
_SHOWN_CHARS = 80
# JSON whitespace other than the newline that separates lines.
_JSON_BLANKS = b" \t\r"
_OUTPUT_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")
# vLLM and llama.cpp keep a request's token limit in a 32-bit signed integer; llama-server
# rejects a larger value with "Value must be between -1 <= value <= 2147483647".
MAX_OUTPUT_TOKENS_PER_REQUEST = 2**31 - 1


class BinaryStream(Protocol):
    """A readable binary stream, such as a botocore StreamingBody or a file opened with "rb"."""

    def read(self, n: int = ...) -> bytes: ...


@dataclass(frozen=True, slots=True)
class LineError:
    """One validation error, with ``line`` None for errors about the whole file."""

    line: int | None
    field: str | None
    message: str


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """A run of consecutive requests, stored as the byte range ``[byte_start, byte_end)``.

    Chunk 0 starts at its first request line. Every later chunk starts where the previous one
    ends, so blank lines between two chunks belong to the later one and consecutive ranges are
    contiguous. ``byte_end`` includes the newline after the last request line, if there is one.
    Blank lines after the last request are in no chunk.
    """

    index: int
    first_line: int
    last_line: int
    byte_start: int
    byte_end: int
    request_count: int


@dataclass(slots=True)
class InputStats:
    """Counts and token estimates over the requests read.

    ``total_bytes`` is the given object size when the caller passed one, otherwise the number
    of bytes read. Token counts are estimates of the prompt size (characters // 4, at least 1
    per request), not tokenizer counts.
    """

    num_requests: int = 0
    total_bytes: int = 0
    url: str | None = None
    avg_input_tokens: float = 0.0
    max_input_tokens: int = 0
    total_input_tokens: int = 0
    max_requested_output_tokens: int | None = None


@dataclass(slots=True)
class ValidationResult:
    """The outcome of ``validate_and_split``. ``chunks`` is empty whenever ``errors`` is not."""

    stats: InputStats
    chunks: list[ChunkSpan] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors


class _ValidationStopped(Exception):
    """Raised inside the scan to end it early, after the error that ended it was recorded."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# One decoder built once, because json.loads with keyword arguments builds a new one per call.
# NaN, Infinity and -Infinity are Python extensions, so they are rejected as invalid JSON.
_JSON_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
# Returned by _Scan.parse_json after it reported an error, because None is a valid JSON value.
_INVALID_JSON = object()


def _show(value: Any) -> str:
    """Format a field value for an error message, cut to about ``_SHOWN_CHARS`` characters."""
    if isinstance(value, str):
        if len(value) > _SHOWN_CHARS:
            return repr(value[: _SHOWN_CHARS - 3] + "...")
        return repr(value)
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    if len(text) > _SHOWN_CHARS:
        text = text[: _SHOWN_CHARS - 3] + "..."
    return text


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


class _FileTooLarge(Exception):
    def __init__(self, bytes_read: int) -> None:
        super().__init__(bytes_read)
        self.bytes_read = bytes_read


class _LineReader:
    """Split a binary stream into physical lines, reading it in blocks.

    Iterating yields ``(start, end, length, line)`` for each line: ``start`` is its byte offset,
    ``end`` the offset just past its newline (or the end of the file for a last line without
    one), and ``length`` its size without the newline. ``line`` is None for a line longer than
    ``MAX_LINE_BYTES``, whose bytes are skipped up to the newline and never held whole.
    Raises ``_FileTooLarge`` as soon as more than ``MAX_FILE_BYTES`` bytes have been read.
    """

    def __init__(self, stream: BinaryStream, block_bytes: int = READ_BLOCK_BYTES) -> None:
        self.stream = stream
        self.block_bytes = block_bytes
        self.bytes_read = 0

    def __iter__(self) -> Iterator[tuple[int, int, int, bytes | None]]:
        pending = b""  # the start of a line whose newline has not been read yet
        pending_start = 0
        skipping = False  # True while inside a line longer than MAX_LINE_BYTES
        skipped_length = 0
        while True:
            block = self.stream.read(self.block_bytes)
            if not block:
                break
            block_start = self.bytes_read
            self.bytes_read += len(block)
            if self.bytes_read > MAX_FILE_BYTES:
                raise _FileTooLarge(self.bytes_read)
            if skipping:
                newline = block.find(b"\n")
                if newline < 0:
                    skipped_length += len(block)
                    continue
                line_end = block_start + newline + 1
                yield pending_start, line_end, skipped_length + newline, None
                skipping = False
                pending_start = line_end
                block = block[newline + 1 :]
            data = pending + block if pending else block
            lines = data.split(b"\n")
            pending = lines.pop()
            start = pending_start
            for line in lines:
                length = len(line)
                end = start + length + 1
                yield start, end, length, line if length <= MAX_LINE_BYTES else None
                start = end
            pending_start = start
            if len(pending) > MAX_LINE_BYTES:
                skipping = True
                skipped_length = len(pending)
                pending = b""
        if skipping:
            yield pending_start, self.bytes_read, skipped_length, None
        elif pending:
            yield pending_start, self.bytes_read, len(pending), pending


def _text_part_chars(parts: list[Any]) -> int:
    """Count the characters of the "text" fields in a list of message content parts."""
    chars = 0
    for part in parts:
        if isinstance(part, dict):
            text = part.get("text")
            if isinstance(text, str):
                chars += len(text)
    return chars


class _Scan:
    """State of one validation pass: errors, seen custom_ids, the url, stats and chunks."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self.errors: list[LineError] = []
        self.truncated = False
        # custom_id digest -> line of its first use. A 16-byte digest keeps memory at about
        # 130 bytes per id, whatever the id's length. NOTE: two different ids with the same
        # digest would be reported as a duplicate, but for 10^6 ids at 128 bits the chance of
        # any collision is about n^2 / 2^129, roughly 1.5e-27.
        self.first_line_of_id: dict[bytes, int] = {}
        self.url: str | None = None
        self.url_line = 0
        self.num_requests = 0
        self.total_input_tokens = 0
        self.max_input_tokens = 0
        self.max_output_tokens: int | None = None
        self.chunks: list[ChunkSpan] = []
        self.chunk_count = 0

    def report(self, line: int | None, field_name: str | None, text: str) -> None:
        """Record an error, or stop the scan when ``MAX_REPORTED_ERRORS`` are already stored."""
        if len(self.errors) >= MAX_REPORTED_ERRORS:
            self.truncated = True
            raise _ValidationStopped
        message = text if line is None else f"line {line}: {text}"
        self.errors.append(LineError(line, field_name, message))

    def add_chunk(
        self, first_line: int, last_line: int, byte_start: int, byte_end: int, count: int
    ) -> None:
        # Spans past MAX_CHUNKS are counted but not stored, because the file is rejected.
        if self.chunk_count < MAX_CHUNKS:
            self.chunks.append(
                ChunkSpan(self.chunk_count, first_line, last_line, byte_start, byte_end, count)
            )
        self.chunk_count += 1

    def check_line(self, line_no: int, line: bytes) -> None:
        """Validate one non-blank request line of at most ``MAX_LINE_BYTES`` bytes."""
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = line[exc.start : exc.start + 4].hex(" ")
            self.report(
                line_no,
                None,
                f"invalid UTF-8 at byte {exc.start + 1} of the line (bytes {bad}); "
                "save the file as UTF-8",
            )
            return
        # raw_decode skips the whitespace checks of decode(), which cost a noticeable share
        # of the time per line. Any line it does not accept whole goes through parse_json.
        try:
            request, end = _JSON_DECODER.raw_decode(text)
        except (ValueError, RecursionError):
            end = -1
        if end != len(text) and (end < 0 or text[end:].strip(" \t\r")):
            request = self.parse_json(line_no, text)
            if request is _INVALID_JSON:
                return
        if isinstance(request, dict):
            self.check_request(line_no, request)
        else:
            self.report(
                line_no,
                None,
                f"expected a JSON object, got a JSON {_json_type(request)} {_show(request)}; "
                "each line must be one request object with custom_id, method, url and body",
            )

    def parse_json(self, line_no: int, text: str) -> Any:
        """Parse a line with the full decoder and return the value, or report the error."""
        try:
            return _JSON_DECODER.decode(text)
        except json.JSONDecodeError as exc:
            near = text[max(0, exc.pos - 20) : exc.pos + 20]
            self.report(
                line_no,
                None,
                f"invalid JSON: {exc.msg} at column {exc.colno} near {_show(near)}; "
                "each line must be one complete JSON object",
            )
        except ValueError as exc:
            # Raised for NaN and Infinity, and for integers longer than Python's digit limit.
            self.report(
                line_no, None, f"invalid JSON: {exc}; each line must be one complete JSON object"
            )
        except RecursionError:
            self.report(
                line_no, None, "invalid JSON: nesting is too deep to parse; flatten the request"
            )
        return _INVALID_JSON

    def check_request(self, line_no: int, request: dict[str, Any]) -> None:
        """Check the fields of one parsed request and add its token estimates to the stats."""
        custom_id = request.get("custom_id")
        if isinstance(custom_id, str) and custom_id:
            # surrogatepass: JSON escapes such as "\ud800" decode to lone surrogates.
            key = custom_id.encode("utf-8", "surrogatepass")
            digest = blake2b(key, digest_size=16).digest()
            first_line = self.first_line_of_id.setdefault(digest, line_no)
            if first_line != line_no:
                self.report(
                    line_no,
                    "custom_id",
                    f"custom_id {_show(custom_id)} duplicates line {first_line}; "
                    "every custom_id must be unique",
                )
        else:
            self.report_custom_id(line_no, custom_id)

        method = request.get("method")
        if method != "POST":
            self.report_method(line_no, method)
        url = request.get("url")
        if url is None or url != self.url:
            url = self.check_url(line_no, url)

        body = request.get("body")
        if not isinstance(body, dict):
            self.report_body(line_no, body)
            return
        if url == CHAT_URL and "messages" in body:
            prompt_chars = self.check_messages(line_no, body["messages"])
        else:
            prompt_chars = self.check_prompt(line_no, body, url)
        if prompt_chars is not None:
            tokens = prompt_chars // 4 or 1
            self.total_input_tokens += tokens
            if tokens > self.max_input_tokens:  # noqa: PLR1730 - a call to max() costs more
                self.max_input_tokens = tokens

        for name in _OUTPUT_TOKEN_FIELDS:
            value = body.get(name)
            if value is None:
                continue
            # bool is a subclass of int, so the exact type is compared.
            if type(value) is not int or value < 1:
                self.report(
                    line_no,
                    f"body.{name}",
                    f"body.{name} must be a positive integer, got {_show(value)}; "
                    "set it to the maximum number of tokens to generate, or omit it",
                )
            elif value > MAX_OUTPUT_TOKENS_PER_REQUEST:
                self.report(
                    line_no,
                    f"body.{name}",
                    f"body.{name} is {value}, more than any engine accepts "
                    f"({MAX_OUTPUT_TOKENS_PER_REQUEST}); set it to at most the model's context "
                    "length, or omit it",
                )
            elif self.max_output_tokens is None or value > self.max_output_tokens:
                self.max_output_tokens = value

        stream = body.get("stream")
        if stream is not None and stream is not False:
            self.report(
                line_no,
                "body.stream",
                f"body.stream is {_show(stream)}, but batch responses cannot be streamed; "
                "remove body.stream or set it to false",
            )

    def report_custom_id(self, line_no: int, custom_id: Any) -> None:
        fix = "give every request a unique, non-empty string custom_id"
        if custom_id is None:
            self.report(line_no, "custom_id", f"missing custom_id; {fix}")
        elif not isinstance(custom_id, str):
            self.report(
                line_no,
                "custom_id",
                f"custom_id must be a string, got {_json_type(custom_id)} {_show(custom_id)}; "
                f"{fix}",
            )
        else:
            self.report(line_no, "custom_id", f"custom_id is empty; {fix}")

    def report_method(self, line_no: int, method: Any) -> None:
        if method is None:
            self.report(line_no, "method", 'missing method; set method to "POST"')
        else:
            self.report(
                line_no, "method", f'method {_show(method)} is not supported; set method to "POST"'
            )

    def report_body(self, line_no: int, body: Any) -> None:
        if body is None:
            self.report(line_no, "body", "missing body; add the request body as a JSON object")
        else:
            self.report(
                line_no,
                "body",
                f"body must be a JSON object, got a JSON {_json_type(body)} {_show(body)}; "
                "put the request parameters in an object",
            )

    def check_url(self, line_no: int, url: Any) -> str | None:
        """Check a url that is missing or differs from the first one.

        Returns the url when it is supported, even if it differs from the first line's.
        """
        supported = ", ".join(SUPPORTED_URLS)
        if url is None:
            self.report(line_no, "url", f"missing url; set url to one of {supported}")
            return None
        if url not in SUPPORTED_URLS:
            self.report(
                line_no, "url", f"url {_show(url)} is not supported; use one of {supported}"
            )
            return None
        if self.url is None:
            self.url = url
            self.url_line = line_no
        else:
            self.report(
                line_no,
                "url",
                f"url {_show(url)} differs from {_show(self.url)} on line {self.url_line}; "
                "every request in a file must use the same url",
            )
        return url

    def check_prompt(self, line_no: int, body: dict[str, Any], url: str | None) -> int | None:
        """Check body.messages or body.prompt and return the prompt's character count.

        The required field follows the line's url. Returns None when the prompt is invalid.
        """
        if url is None:
            # The url is missing or unsupported, so check whichever prompt field is present.
            if "messages" in body:
                return self.check_messages(line_no, body["messages"])
            if "prompt" in body:
                return self.check_completion_prompt(line_no, body["prompt"])
            self.report(
                line_no,
                "body",
                f"body has neither messages nor prompt; add body.messages for {CHAT_URL} "
                f"or body.prompt for {COMPLETIONS_URL}",
            )
            return None
        if url == CHAT_URL:
            if "messages" not in body:
                hint = f" (body.prompt is for {COMPLETIONS_URL})" if "prompt" in body else ""
                self.report(
                    line_no,
                    "body.messages",
                    f"missing body.messages{hint}; {CHAT_URL} requests need a non-empty "
                    "messages list",
                )
                return None
            return self.check_messages(line_no, body["messages"])
        if "prompt" not in body:
            hint = f" (body.messages is for {CHAT_URL})" if "messages" in body else ""
            self.report(
                line_no,
                "body.prompt",
                f"missing body.prompt{hint}; {COMPLETIONS_URL} requests need a prompt string "
                "or a non-empty list of strings",
            )
            return None
        return self.check_completion_prompt(line_no, body["prompt"])

    def check_messages(self, line_no: int, messages: Any) -> int | None:
        """Check body.messages and return the characters of its text content."""
        if not isinstance(messages, list) or not messages:
            self.report(
                line_no,
                "body.messages",
                f"body.messages must be a non-empty list, got {_show(messages)}; "
                'add at least one message such as {"role": "user", "content": "..."}',
            )
            return None
        chars = 0
        for position, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                self.report(
                    line_no,
                    f"body.messages[{position}]",
                    f"body.messages[{position}] must be an object with a string role, got "
                    f'{_show(message)}; write each message as {{"role": ..., "content": ...}}',
                )
                return None
            content = message.get("content")
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                chars += _text_part_chars(content)
        return chars

    def check_completion_prompt(self, line_no: int, prompt: Any) -> int | None:
        if isinstance(prompt, str):
            return len(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(text, str) for text in prompt):
            return sum(len(text) for text in prompt)
        self.report(
            line_no,
            "body.prompt",
            f"body.prompt must be a string or a non-empty list of strings, got {_show(prompt)}; "
            "put the prompt text there",
        )
        return None

    def stats(self, total_bytes: int) -> InputStats:
        count = self.num_requests
        return InputStats(
            num_requests=count,
            total_bytes=total_bytes,
            url=self.url,
            avg_input_tokens=self.total_input_tokens / count if count else 0.0,
            max_input_tokens=self.max_input_tokens,
            total_input_tokens=self.total_input_tokens,
            max_requested_output_tokens=self.max_output_tokens,
        )


def validate_and_split(
    stream: BinaryStream, chunk_size: int, *, total_bytes: int | None = None
) -> ValidationResult:
    """Validate a batch JSONL stream and split its requests into chunks of ``chunk_size``.

    Reads the stream once, in blocks. ``total_bytes`` is the object's size when known (S3
    ContentLength): a size over ``MAX_FILE_BYTES`` is rejected before reading, and a stream
    that ends at another size is reported. Validation stops early when a
    ``MAX_REPORTED_ERRORS + 1``-th error is found (``truncated`` is then True), at more than
    ``MAX_REQUESTS`` requests and at more than ``MAX_FILE_BYTES`` bytes read. Raises
    ValueError when ``chunk_size`` is below 1.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    scan = _Scan(chunk_size)
    if total_bytes is not None and total_bytes > MAX_FILE_BYTES:
        scan.report(
            None,
            None,
            f"input file is {total_bytes} bytes, more than the {MAX_FILE_BYTES}-byte (2 GiB) "
            "limit; split it into smaller files",
        )
        return ValidationResult(stats=scan.stats(total_bytes), errors=scan.errors)
    reader = _LineReader(stream)
    completed = False
    try:
        _scan_lines(scan, reader)
        completed = True
        _check_whole_file(scan, reader.bytes_read, total_bytes)
    except _FileTooLarge:
        try:
            scan.report(
                None,
                None,
                f"input file is larger than the {MAX_FILE_BYTES}-byte (2 GiB) limit, so "
                "validation stopped there; split it into smaller files",
            )
        except _ValidationStopped:
            pass
    except _ValidationStopped:
        pass
    chunks = scan.chunks if completed and not scan.errors else []
    size = total_bytes if total_bytes is not None else reader.bytes_read
    return ValidationResult(
        stats=scan.stats(size), chunks=chunks, errors=scan.errors, truncated=scan.truncated
    )


def _scan_lines(scan: _Scan, reader: _LineReader) -> None:
    """Validate every line and build the chunks."""
    chunk_size = scan.chunk_size
    check_line = scan.check_line
    line_no = 0
    # The chunk being filled: its first line, first byte and number of requests so far.
    chunk_first_line = 0
    chunk_start = 0
    in_chunk = 0
    next_chunk_start: int | None = None  # where the next chunk starts, once one has closed
    last_line = 0
    last_end = 0
    for start, end, length, line in reader:
        line_no += 1
        if line is not None:
            if line_no == 1 and line.startswith(UTF8_BOM):
                scan.report(
                    1,
                    None,
                    "the file starts with a UTF-8 byte order mark (BOM); "
                    "save the file as UTF-8 without a BOM",
                )
                line = line[len(UTF8_BOM) :]
            if not line.strip(_JSON_BLANKS):
                continue
        if scan.num_requests == MAX_REQUESTS:
            scan.report(
                line_no,
                None,
                f"the file has more than {MAX_REQUESTS} requests, so validation stopped at "
                f"this line; split the input into files of at most {MAX_REQUESTS} requests",
            )
            raise _ValidationStopped
        scan.num_requests += 1

        if in_chunk == 0:
            chunk_first_line = line_no
            chunk_start = start if next_chunk_start is None else next_chunk_start
        in_chunk += 1
        last_line = line_no
        last_end = end
        if in_chunk == chunk_size:
            scan.add_chunk(chunk_first_line, last_line, chunk_start, last_end, in_chunk)
            next_chunk_start = last_end
            in_chunk = 0

        if line is None:
            scan.report(
                line_no,
                None,
                f"line is {length} bytes, more than the {MAX_LINE_BYTES}-byte limit per "
                "request; shorten the prompt or split the request",
            )
        else:
            check_line(line_no, line)
    if in_chunk:
        scan.add_chunk(chunk_first_line, last_line, chunk_start, last_end, in_chunk)


def _check_whole_file(scan: _Scan, bytes_read: int, total_bytes: int | None) -> None:
    if total_bytes is not None and bytes_read != total_bytes:
        scan.report(
            None,
            None,
            f"input file ended after {bytes_read} bytes, but its size is {total_bytes} bytes; "
            "the file may have been overwritten while it was read, so submit the job again",
        )
    if scan.num_requests == 0:
        scan.report(
            None,
            None,
            "input file contains no requests; add one JSON request object per line",
        )
        return
    if scan.chunk_count > MAX_CHUNKS:
        min_chunk_size = math.ceil(scan.num_requests / MAX_CHUNKS)
        scan.report(
            None,
            "chunk_size",
            f"{scan.num_requests} requests at chunk_size {scan.chunk_size} make "
            f"{scan.chunk_count} chunks, more than the {MAX_CHUNKS}-chunk limit; "
            f"raise chunk_size to at least {min_chunk_size}",
        )
