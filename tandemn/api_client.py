"""HTTP client of the control-plane API for the CLI: errors become one readable exception."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

DEFAULT_API_URL = "http://127.0.0.1:26336"
# `tandemn local up` writes stack.pid and stack.json here, so that other commands find a stack
# started on another --port. The variable moves the folder, so a test's stack leaves the files
# of the user's stack alone.
LOCAL_STATE_DIR = Path(__file__).resolve().parent.parent / ".cache" / "local"
STATE_DIR_VARIABLE = "TANDEMN_LOCAL_STATE_DIR"


class ApiError(Exception):
    """The API answered an error status, or could not be reached."""

    def __init__(self, message: str, status_code: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body


def local_state_dir() -> Path:
    """Returns the folder where `tandemn local up` writes its pid and its addresses."""
    directory = os.environ.get(STATE_DIR_VARIABLE)
    return Path(directory) if directory else LOCAL_STATE_DIR


def running_local_stack_url() -> str | None:
    """Returns the API URL of the running `tandemn local up` stack, or None when none runs."""
    state = local_state_dir()
    try:
        pid = int((state / "stack.pid").read_text().strip())
        os.kill(pid, 0)
        return json.loads((state / "stack.json").read_text())["api_url"]
    except (OSError, ValueError, KeyError):
        return None


def default_api_url() -> str:
    """Returns $TANDEMN_API_URL, else the running local stack's URL, else the default port's."""
    return os.environ.get("TANDEMN_API_URL") or running_local_stack_url() or DEFAULT_API_URL


def _error_message(response: httpx.Response) -> tuple[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:500]}", response.text
    if isinstance(body, dict):
        message = body.get("message") or body.get("Message") or str(body)
        lines = [f"HTTP {response.status_code}: {message}"]
        for error in body.get("errors") or []:
            if isinstance(error, dict) and error.get("message") and error["message"] not in message:
                lines.append(f"  - {error['message']}")
        return "\n".join(lines), body
    return f"HTTP {response.status_code}: {body}", body


class ApiClient:
    def __init__(self, base_url: str, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        try:
            response = self._http.request(method, path, json=body, params=params)
        except httpx.HTTPError as error:
            raise ApiError(
                f"cannot reach the control plane at {self.base_url} ({error}); start it with "
                "`tandemn local up` or set --api-url / TANDEMN_API_URL"
            ) from error
        if response.status_code == 204:
            return None
        if response.status_code >= 400:
            message, body_data = _error_message(response)
            raise ApiError(message, response.status_code, body_data)
        return response.json()

    def get_text(self, path: str, params: dict[str, Any] | None = None) -> str:
        """GETs a non-JSON body, such as the server-sent events of ``/metrics/stream``."""
        try:
            response = self._http.get(path, params=params)
        except httpx.HTTPError as error:
            raise ApiError(
                f"cannot reach the control plane at {self.base_url} ({error}); start it with "
                "`tandemn local up` or set --api-url / TANDEMN_API_URL"
            ) from error
        if response.status_code >= 400:
            message, body_data = _error_message(response)
            raise ApiError(message, response.status_code, body_data)
        return response.text

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.request("POST", path, body=body)

    def upload(self, path: Path) -> str:
        """Uploads a local file through a presigned URL; returns its s3:// URI."""
        size = path.stat().st_size
        target = self.post(
            "/uploads", {"filename": _safe_name(path.name), "size_bytes": max(size, 1)}
        )
        with path.open("rb") as handle:
            try:
                response = httpx.put(target["upload_url"], content=handle, timeout=600.0)
            except httpx.HTTPError as error:
                raise ApiError(f"upload of {path} failed: {error}") from error
        if response.status_code >= 300:
            raise ApiError(
                f"upload of {path} failed: HTTP {response.status_code} {response.text[:300]}"
            )
        return target["input_file"]

    def download(
        self,
        url: str,
        destination: Path,
        on_progress: Callable[[int, int | None], None] | None = None,
    ) -> int:
        """Streams ``url`` into ``destination``; returns the bytes written.

        ``on_progress(written, total)`` is called after each block; ``total`` is the
        Content-Length, or None when the server sends none.
        """
        written = 0
        temporary = destination.with_suffix(destination.suffix + ".part")
        try:
            destination.parent.mkdir(parents=True, exist_ok=True)
            with httpx.stream("GET", url, timeout=600.0) as response:
                if response.status_code >= 300:
                    raise ApiError(
                        f"download to {destination} failed: HTTP {response.status_code}"
                    )
                length = response.headers.get("content-length")
                total = int(length) if length and length.isdigit() else None
                with temporary.open("wb") as handle:
                    for block in response.iter_bytes():
                        handle.write(block)
                        written += len(block)
                        if on_progress is not None:
                            on_progress(written, total)
            temporary.replace(destination)
        except OSError as error:
            _remove_quietly(temporary)
            reason = error.strerror or str(error)
            raise ApiError(
                f"cannot write {destination}: {reason}; choose another path with -o"
            ) from error
        except httpx.HTTPError as error:
            _remove_quietly(temporary)
            raise ApiError(f"download to {destination} failed: {error}") from error
        return written


def _remove_quietly(path: Path) -> None:
    """Removes a partial download; a path that cannot exist (its parent is a file) is ignored."""
    with contextlib.suppress(OSError):
        path.unlink()


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    return cleaned[:200] or "input.jsonl"
