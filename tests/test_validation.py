"""Streaming validation and chunk splitting of batch JSONL inputs."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from bench.workloads import write_batch_file
from chalicelib import validation
from chalicelib.validation import (
    MAX_CHUNKS,
    MAX_LINE_BYTES,
    MAX_REPORTED_ERRORS,
    ChunkSpan,
    validate_and_split,
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def chat_request(custom_id: str, content: str = "Say hello.", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"model": "m", "messages": [{"role": "user", "content": content}], **body},
    }


def completion_request(custom_id: str, prompt: Any = "Say hello.", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": COMPLETIONS,
        "body": {"model": "m", "prompt": prompt, **body},
    }


def line(record: Any) -> bytes:
    return json.dumps(record).encode() + b"\n"


def jsonl(*records: Any) -> bytes:
    return b"".join(line(record) for record in records)


def valid_file(count: int) -> bytes:
    return jsonl(*(chat_request(f"req-{i}") for i in range(count)))


def validate(data: bytes, chunk_size: int = 10, **kwargs: Any) -> validation.ValidationResult:
    return validate_and_split(io.BytesIO(data), chunk_size, **kwargs)


def only_error(result: validation.ValidationResult) -> validation.LineError:
    assert len(result.errors) == 1, result.errors
    return result.errors[0]


class TrickleStream:
    """A stream that returns at most ``step`` bytes per read, like a slow network body."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data = data
        self.position = 0
        self.step = step

    def read(self, n: int = -1) -> bytes:
        size = min(n, self.step)
        chunk = self.data[self.position : self.position + size]
        self.position += len(chunk)
        return chunk


class UnreadableStream:
    def read(self, n: int = -1) -> bytes:
        raise AssertionError("the stream must not be read")


def request_lines_of(data: bytes, span: ChunkSpan) -> list[bytes]:
    """Slice a chunk's byte range out of the file and return its non-blank lines."""
    piece = data[span.byte_start : span.byte_end]
    return [text for text in piece.split(b"\n") if text.strip(b" \t\r")]


def assert_chunks_cover(data: bytes, result: validation.ValidationResult) -> None:
    """Check that the chunk ranges are contiguous and reproduce every request line in order."""
    requests = [text for text in data.split(b"\n") if text.strip(b" \t\r")]
    sliced: list[bytes] = []
    for previous, span in zip(result.chunks, result.chunks[1:]):
        assert span.byte_start == previous.byte_end
    for index, span in enumerate(result.chunks):
        assert span.index == index
        lines = request_lines_of(data, span)
        assert len(lines) == span.request_count
        sliced.extend(lines)
    assert sliced == requests


# Valid input, stats and chunks


def test_valid_file_is_ok():
    result = validate(valid_file(25), chunk_size=10)
    assert result.ok
    assert result.errors == []
    assert result.truncated is False
    assert result.stats.num_requests == 25
    assert result.stats.url == CHAT


def test_chunk_counts_and_sizes():
    for count, chunk_size, expected_sizes in [
        (25, 10, [10, 10, 5]),
        (30, 10, [10, 10, 10]),
        (1, 10, [1]),
        (7, 1, [1] * 7),
        (7, 100, [7]),
    ]:
        result = validate(valid_file(count), chunk_size=chunk_size)
        assert [span.request_count for span in result.chunks] == expected_sizes, (count, chunk_size)


def test_chunk_line_numbers():
    result = validate(valid_file(25), chunk_size=10)
    assert [(span.first_line, span.last_line) for span in result.chunks] == [
        (1, 10),
        (11, 20),
        (21, 25),
    ]


def test_byte_ranges_reproduce_request_lines():
    data = valid_file(25)
    result = validate(data, chunk_size=4)
    assert result.chunks[0].byte_start == 0
    assert result.chunks[-1].byte_end == len(data)
    assert_chunks_cover(data, result)


def test_stats_total_bytes_is_bytes_read():
    data = valid_file(3)
    assert validate(data).stats.total_bytes == len(data)


def test_stats_total_bytes_uses_given_size():
    data = valid_file(3)
    assert validate(data, total_bytes=len(data)).stats.total_bytes == len(data)


def test_token_estimates_for_chat_messages():
    data = jsonl(
        chat_request("a", "x" * 40),  # 10 tokens
        chat_request("b", "x" * 3),  # 0 by the formula, raised to the minimum of 1
        {
            "custom_id": "c",
            "method": "POST",
            "url": CHAT,
            "body": {
                "messages": [
                    {"role": "system", "content": "y" * 8},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "z" * 12},
                            {"type": "image_url", "image_url": {"url": "data:..." + "q" * 400}},
                        ],
                    },
                    {"role": "assistant", "content": None},
                ]
            },
        },  # (8 + 12) // 4 = 5 tokens; the image part does not count
    )
    stats = validate(data).stats
    assert stats.total_input_tokens == 16
    assert stats.max_input_tokens == 10
    assert stats.avg_input_tokens == pytest.approx(16 / 3)


def test_token_estimates_for_completion_prompts():
    data = jsonl(
        completion_request("a", "p" * 20),
        completion_request("b", ["p" * 8, "q" * 16]),
    )
    stats = validate(data).stats
    assert stats.total_input_tokens == 5 + 6
    assert stats.max_input_tokens == 6
    assert stats.url == COMPLETIONS


def test_max_requested_output_tokens():
    data = jsonl(
        chat_request("a", max_tokens=64),
        chat_request("b", max_completion_tokens=512),
        chat_request("c"),
    )
    assert validate(data).stats.max_requested_output_tokens == 512


def test_max_requested_output_tokens_none_without_limits():
    assert validate(valid_file(2)).stats.max_requested_output_tokens is None


def test_real_file_from_disk(tmp_path):
    path = tmp_path / "batch.jsonl"
    size = write_batch_file(path, 2_500, seed=3)
    assert path.stat().st_size == size
    with open(path, "rb") as stream:
        result = validate_and_split(stream, 1000, total_bytes=size)
    assert result.ok, result.errors
    assert result.stats.num_requests == 2_500
    assert [span.request_count for span in result.chunks] == [1000, 1000, 500]
    assert result.stats.max_requested_output_tokens == 128
    assert_chunks_cover(path.read_bytes(), result)


def test_real_completions_file_from_disk(tmp_path):
    path = tmp_path / "batch.jsonl"
    write_batch_file(path, 300, url=COMPLETIONS, max_tokens=7)
    with open(path, "rb") as stream:
        result = validate_and_split(stream, 128)
    assert result.ok, result.errors
    assert result.stats.url == COMPLETIONS
    assert result.stats.max_requested_output_tokens == 7


def test_workload_generator_is_deterministic(tmp_path):
    first = tmp_path / "a.jsonl"
    second = tmp_path / "b.jsonl"
    write_batch_file(first, 200, seed=5)
    write_batch_file(second, 200, seed=5)
    assert first.read_bytes() == second.read_bytes()


def test_workload_lines_average_about_400_bytes(tmp_path):
    path = tmp_path / "batch.jsonl"
    size = write_batch_file(path, 2_000)
    assert 300 <= size / 2_000 <= 500


def test_small_reads_give_same_result():
    data = b"\n" + valid_file(13) + b"   \n" + valid_file(0) + jsonl(chat_request("last"))
    whole = validate_and_split(io.BytesIO(data), 3)
    for step in (1, 2, 7, 64):
        trickled = validate_and_split(TrickleStream(data, step), 3)
        assert trickled.chunks == whole.chunks, step
        assert trickled.errors == whole.errors, step


def test_chunk_size_below_one_raises():
    with pytest.raises(ValueError, match="chunk_size must be at least 1"):
        validate(valid_file(1), chunk_size=0)


# Line endings and blank lines


def test_crlf_line_endings_are_accepted():
    data = valid_file(5).replace(b"\n", b"\r\n")
    result = validate(data, chunk_size=2)
    assert result.ok, result.errors
    assert result.stats.num_requests == 5
    assert_chunks_cover(data, result)


def test_last_line_without_newline():
    data = valid_file(4).rstrip(b"\n")
    result = validate(data, chunk_size=3)
    assert result.ok, result.errors
    assert result.stats.num_requests == 4
    assert result.chunks[-1].byte_end == len(data)
    assert_chunks_cover(data, result)


def test_blank_lines_count_for_line_numbers():
    data = b"\n" + line(chat_request("a")) + b"  \t \n\n" + line({"custom_id": "b"})
    error = validate(data).errors[0]
    assert error.line == 5


def test_blank_lines_are_not_requests():
    data = b"\n \n" + line(chat_request("a")) + b"\r\n\t\n" + line(chat_request("b")) + b"\n\n"
    result = validate(data)
    assert result.ok, result.errors
    assert result.stats.num_requests == 2


def test_blank_lines_belong_to_chunk_they_fall_in():
    first = line(chat_request("a"))
    second = line(chat_request("b"))
    data = b"\n\n" + first + b"\n \n" + second + b"\n"
    result = validate(data, chunk_size=1)
    # Leading blank lines precede chunk 0, and trailing ones follow the last chunk.
    assert result.chunks[0].byte_start == 2
    assert result.chunks[0].byte_end == 2 + len(first)
    # Blank lines between two chunks are at the start of the later one.
    assert result.chunks[1].byte_start == 2 + len(first)
    assert result.chunks[1].byte_end == len(data) - 1
    assert result.chunks[1].first_line == 6
    assert_chunks_cover(data, result)


def test_empty_file_has_no_requests():
    error = only_error(validate(b""))
    assert error.line is None
    assert error.message.startswith("input file contains no requests")


def test_blank_only_file_has_no_requests():
    error = only_error(validate(b"\n  \n\r\n\t\n"))
    assert error.line is None
    assert "contains no requests" in error.message


def test_bom_is_rejected_on_line_one():
    result = validate(b"\xef\xbb\xbf" + valid_file(2))
    error = only_error(result)
    assert error.line == 1
    assert "byte order mark" in error.message
    assert "without a BOM" in error.message
    assert result.chunks == []


# Encoding and JSON syntax


def test_invalid_utf8_reports_line():
    data = valid_file(2) + b'{"custom_id": "\xff\xfe"}\n' + valid_file(0)
    error = only_error(validate(data))
    assert error.line == 3
    assert error.message.startswith("line 3: invalid UTF-8")
    assert "ff fe" in error.message


def test_invalid_json_reports_line_and_column():
    data = valid_file(1) + b'{"custom_id": "b" "method": "POST"}\n'
    error = only_error(validate(data))
    assert error.line == 2
    assert error.message.startswith("line 2: invalid JSON")
    assert "column 19" in error.message


def test_trailing_data_after_object_is_invalid_json():
    data = line(chat_request("a")).rstrip(b"\n") + b" {}\n"
    error = only_error(validate(data))
    assert "invalid JSON: Extra data" in error.message


def test_leading_whitespace_before_object_is_accepted():
    data = b"  \t" + line(chat_request("a"))
    assert validate(data).ok


def test_nan_is_invalid_json():
    data = line(chat_request("a")).replace(b'"Say hello."', b"NaN")
    error = only_error(validate(data))
    assert "NaN is not valid JSON" in error.message


def test_deep_nesting_is_invalid_json():
    data = b"[" * 200_000 + b"]" * 200_000 + b"\n"
    error = only_error(validate(data))
    assert "nesting is too deep" in error.message


def test_line_that_is_not_an_object():
    for text, kind in [(b"[1, 2]", "array"), (b'"req"', "string"), (b"null", "null")]:
        error = only_error(validate(text + b"\n"))
        assert f"got a JSON {kind}" in error.message, text


def test_null_line_with_leading_space_is_reported():
    error = only_error(validate(b" null\n"))
    assert "got a JSON null" in error.message


# custom_id


def test_missing_custom_id():
    record = chat_request("a")
    del record["custom_id"]
    error = only_error(validate(line(record)))
    assert error.field == "custom_id"
    assert error.message.startswith("line 1: missing custom_id")


def test_custom_id_must_be_string():
    record = chat_request("a")
    record["custom_id"] = 42
    error = only_error(validate(line(record)))
    assert error.field == "custom_id"
    assert "custom_id must be a string, got number 42" in error.message


def test_custom_id_must_not_be_empty():
    error = only_error(validate(line(chat_request(""))))
    assert error.field == "custom_id"
    assert "custom_id is empty" in error.message


def test_duplicate_custom_id_names_both_lines():
    data = jsonl(*(chat_request(f"req-{i}") for i in range(1, 6)), chat_request("x"))
    data += b"\n" + line(chat_request("req-3"))
    error = only_error(validate(data))
    assert error.line == 8
    assert error.field == "custom_id"
    assert error.message == (
        "line 8: custom_id 'req-3' duplicates line 3; every custom_id must be unique"
    )


def test_duplicate_custom_id_written_with_escape():
    data = line(chat_request("a")) + line(chat_request("b")).replace(b'"b"', b'"\\u0061"')
    error = only_error(validate(data))
    assert "duplicates line 1" in error.message


def test_lone_surrogate_custom_id_is_accepted():
    data = line(chat_request("a")).replace(b'"a"', b'"\\ud800"')
    assert validate(data).ok


def test_long_value_is_cut_in_message():
    error = only_error(validate(jsonl(chat_request("k" * 5000), chat_request("k" * 5000))))
    assert len(error.message) < 200
    assert "..." in error.message


# method and url


def test_missing_method():
    record = chat_request("a")
    del record["method"]
    error = only_error(validate(line(record)))
    assert error.field == "method"
    assert "missing method" in error.message


def test_method_must_be_post():
    record = chat_request("a")
    record["method"] = "GET"
    error = only_error(validate(line(record)))
    assert error.field == "method"
    assert error.message == "line 1: method 'GET' is not supported; set method to \"POST\""


def test_unsupported_url():
    record = chat_request("a")
    record["url"] = "/v1/embeddings"
    error = only_error(validate(line(record)))
    assert error.field == "url"
    assert "'/v1/embeddings' is not supported" in error.message
    assert "/v1/chat/completions, /v1/completions" in error.message


def test_missing_url():
    record = chat_request("a")
    del record["url"]
    error = only_error(validate(line(record)))
    assert error.field == "url"
    assert "missing url" in error.message


def test_mixed_urls_name_first_line_url():
    data = b"\n" + jsonl(chat_request("a"), chat_request("b"), completion_request("c"))
    error = only_error(validate(data))
    assert error.line == 4
    assert error.field == "url"
    assert "'/v1/completions' differs from '/v1/chat/completions' on line 2" in error.message


def test_url_of_first_valid_line_is_the_reference():
    first = chat_request("a")
    first["url"] = "/v1/embeddings"
    data = jsonl(first, completion_request("b"), completion_request("c"))
    result = validate(data)
    error = only_error(result)
    assert error.line == 1
    assert result.stats.url == COMPLETIONS


# body


def test_missing_body():
    record = chat_request("a")
    del record["body"]
    error = only_error(validate(line(record)))
    assert error.field == "body"
    assert "missing body" in error.message


def test_body_must_be_object():
    record = chat_request("a")
    record["body"] = ["hello"]
    error = only_error(validate(line(record)))
    assert error.field == "body"
    assert 'got a JSON array ["hello"]' in error.message


def test_chat_messages_missing():
    record = chat_request("a")
    del record["body"]["messages"]
    error = only_error(validate(line(record)))
    assert error.field == "body.messages"
    assert "missing body.messages" in error.message


def test_chat_body_with_prompt_gets_hint():
    record = chat_request("a")
    record["body"] = {"prompt": "hi"}
    error = only_error(validate(line(record)))
    assert error.field == "body.messages"
    assert "body.prompt is for /v1/completions" in error.message


def test_chat_messages_must_be_non_empty_list():
    for messages in ([], "hello", {"role": "user"}):
        record = chat_request("a")
        record["body"]["messages"] = messages
        error = only_error(validate(line(record)))
        assert error.field == "body.messages", messages
        assert "must be a non-empty list" in error.message, messages


def test_chat_message_needs_role():
    record = chat_request("a")
    record["body"]["messages"].append({"content": "no role"})
    error = only_error(validate(line(record)))
    assert error.field == "body.messages[1]"
    assert "must be an object with a string role" in error.message


def test_completion_prompt_string_and_list_are_accepted():
    data = jsonl(completion_request("a", "hi"), completion_request("b", ["x", "y"]))
    assert validate(data).ok


def test_completion_prompt_wrong_type():
    for prompt in (42, [], ["ok", 3], None):
        error = only_error(validate(line(completion_request("a", prompt))))
        assert error.field == "body.prompt", prompt
        assert "must be a string or a non-empty list of strings" in error.message, prompt


def test_completion_prompt_missing():
    record = completion_request("a")
    del record["body"]["prompt"]
    record["body"]["messages"] = [{"role": "user", "content": "hi"}]
    error = only_error(validate(line(record)))
    assert error.field == "body.prompt"
    assert "missing body.prompt (body.messages is for /v1/chat/completions)" in error.message


def test_body_without_prompt_or_messages():
    record = {"custom_id": "a", "method": "POST", "url": "/v1/x", "body": {"model": "m"}}
    errors = validate(line(record)).errors
    assert [error.field for error in errors] == ["url", "body"]
    assert "neither messages nor prompt" in errors[1].message


def test_max_tokens_must_be_positive_integer():
    for value in (0, -1, 1.5, "16", True):
        error = only_error(validate(line(chat_request("a", max_tokens=value))))
        assert error.field == "body.max_tokens", value
        assert "must be a positive integer" in error.message, value


def test_max_tokens_above_engine_limit():
    error = only_error(validate(line(chat_request("a", max_tokens=10**12))))
    assert error.field == "body.max_tokens"
    assert "body.max_tokens is 1000000000000, more than any engine accepts" in error.message
    assert validate(line(chat_request("a", max_tokens=2**31 - 1))).errors == []


def test_max_completion_tokens_must_be_positive_integer():
    error = only_error(validate(line(chat_request("a", max_completion_tokens=False))))
    assert error.field == "body.max_completion_tokens"
    assert "got false" in error.message


def test_null_max_tokens_counts_as_absent():
    assert validate(line(chat_request("a", max_tokens=None))).ok


def test_stream_true_is_rejected():
    error = only_error(validate(line(chat_request("a", stream=True))))
    assert error.field == "body.stream"
    assert "cannot be streamed" in error.message


def test_stream_false_is_accepted():
    assert validate(line(chat_request("a", stream=False))).ok


def test_one_line_can_have_several_errors():
    record = {"custom_id": "", "method": "PUT", "url": CHAT, "body": {"messages": []}}
    errors = validate(line(record)).errors
    assert [error.field for error in errors] == ["custom_id", "method", "body.messages"]
    assert all(error.line == 1 for error in errors)


def test_messages_start_with_line_number():
    data = jsonl(chat_request("a"), {"custom_id": 1}, chat_request("a", stream=True))
    for error in validate(data).errors:
        assert error.message.startswith(f"line {error.line}: "), error


def test_errors_leave_no_chunks():
    data = valid_file(30) + line(chat_request("req-0"))
    result = validate(data, chunk_size=10)
    assert not result.ok
    assert result.chunks == []


# Size limits


def padded_request(custom_id: str, size: int) -> bytes:
    """Return a valid request line of exactly ``size`` bytes, without the newline."""
    empty = json.dumps(chat_request(custom_id, "")).encode()
    return json.dumps(chat_request(custom_id, "x" * (size - len(empty)))).encode()


def test_line_of_exactly_max_bytes_is_accepted():
    data = padded_request("a", MAX_LINE_BYTES) + b"\n"
    result = validate(data)
    assert result.ok, result.errors
    assert result.stats.max_input_tokens > 200_000


def test_line_one_byte_over_max_is_rejected():
    data = padded_request("a", MAX_LINE_BYTES + 1) + b"\n"
    error = only_error(validate(data))
    assert error.line == 1
    assert f"line is {MAX_LINE_BYTES + 1} bytes" in error.message


def test_long_line_in_middle_reported():
    long_line = padded_request("big", 2_000_000) + b"\n"
    data = valid_file(3) + long_line + valid_file(2) + line(chat_request("b", max_tokens=0))
    for stream in (io.BytesIO(data), TrickleStream(data, 4096)):
        result = validate_and_split(stream, 10)
        assert [error.line for error in result.errors] == [4, 5, 6, 7]
        assert "line is 2000000 bytes" in result.errors[0].message
        assert "'req-0' duplicates line 1" in result.errors[1].message
        assert "'req-1' duplicates line 2" in result.errors[2].message
        assert result.errors[3].field == "body.max_tokens"
        assert result.stats.num_requests == 7


def test_long_last_line_without_newline():
    data = valid_file(2) + b"x" * (MAX_LINE_BYTES + 5)
    error = only_error(validate(data))
    assert error.line == 3
    assert f"line is {MAX_LINE_BYTES + 5} bytes" in error.message


def test_long_line_is_read_in_blocks():
    reads: list[int] = []

    class CountingStream(io.BytesIO):
        def read(self, n: int = -1) -> bytes:
            reads.append(n)
            return super().read(n)

    data = b"y" * (5 * 1024 * 1024) + b"\n" + valid_file(1)
    result = validate_and_split(CountingStream(data), 10)
    assert [error.line for error in result.errors] == [1]
    assert max(reads) == validation.READ_BLOCK_BYTES


def test_too_many_requests(monkeypatch):
    monkeypatch.setattr(validation, "MAX_REQUESTS", 5)
    data = valid_file(4) + b"\n" + jsonl(*(chat_request(f"more-{i}") for i in range(10)))
    result = validate(data)
    error = only_error(result)
    assert error.line == 7  # the sixth request, after four requests and a blank line
    assert "more than 5 requests" in error.message
    assert result.chunks == []


def test_exactly_max_requests_is_accepted(monkeypatch):
    monkeypatch.setattr(validation, "MAX_REQUESTS", 5)
    assert validate(valid_file(5)).ok


def test_oversized_total_bytes_rejected_before_reading():
    result = validate_and_split(UnreadableStream(), 10, total_bytes=validation.MAX_FILE_BYTES + 1)
    error = only_error(result)
    assert error.line is None
    assert f"{validation.MAX_FILE_BYTES + 1} bytes" in error.message
    assert result.stats.total_bytes == validation.MAX_FILE_BYTES + 1


def test_oversized_stream_rejected_while_reading(monkeypatch):
    monkeypatch.setattr(validation, "MAX_FILE_BYTES", 1000)
    result = validate_and_split(TrickleStream(valid_file(50), 100), 10)
    error = only_error(result)
    assert error.line is None
    assert "larger than the 1000-byte" in error.message
    assert result.chunks == []


def test_stream_shorter_than_total_bytes():
    data = valid_file(3)
    error = only_error(validate(data, total_bytes=len(data) + 10))
    assert error.line is None
    assert f"ended after {len(data)} bytes" in error.message


# Error limit


def test_errors_stop_at_max_reported():
    bad = {"custom_id": "x", "method": "GET", "url": CHAT, "body": {"messages": [{"role": "u"}]}}
    data = b"".join(line(dict(bad, custom_id=f"r{i}")) for i in range(25))
    result = validate(data)
    assert len(result.errors) == MAX_REPORTED_ERRORS
    assert result.truncated is True
    assert result.errors[-1].line == MAX_REPORTED_ERRORS


def test_exactly_max_errors_is_not_truncated():
    bad = {"custom_id": "x", "method": "GET", "url": CHAT, "body": {"messages": [{"role": "u"}]}}
    data = b"".join(line(dict(bad, custom_id=f"r{i}")) for i in range(MAX_REPORTED_ERRORS))
    result = validate(data)
    assert len(result.errors) == MAX_REPORTED_ERRORS
    assert result.truncated is False


# Chunk limit


def minimal_lines(count: int) -> bytes:
    template = '{"custom_id":"%d","method":"POST","url":"/v1/completions","body":{"prompt":"p"}}\n'
    return "".join(template % i for i in range(count)).encode()


def test_too_many_chunks_is_file_error():
    result = validate(minimal_lines(MAX_CHUNKS + 1), chunk_size=1)
    error = only_error(result)
    assert error.line is None
    assert error.field == "chunk_size"
    assert f"{MAX_CHUNKS + 1} chunks" in error.message
    assert "raise chunk_size to at least 2" in error.message
    assert result.chunks == []


def test_max_chunks_is_accepted():
    result = validate(minimal_lines(MAX_CHUNKS + 1), chunk_size=2)
    assert result.ok, result.errors
    assert len(result.chunks) == MAX_CHUNKS // 2 + 1
