"""Run ``git http-backend`` as a CGI program for one smart HTTP request."""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import trio

from daemon.sandbox._repos import git_environment

__all__ = ["CGIResponse", "run_http_backend"]

log = logging.getLogger(__name__)

# Set for upload-pack through GIT_CONFIG_COUNT (git-config(1), "ENVIRONMENT").
# GitHub lets a client fetch any commit by sha, which a depth-1 fetch of an
# exact commit needs; pushing is never served.
_UPLOAD_CONFIG = {
    "uploadpack.allowAnySHA1InWant": "true",
    "uploadpack.allowReachableSHA1InWant": "true",
    "uploadpack.allowTipSHA1InWant": "true",
    "http.uploadpack": "true",
    "http.receivepack": "false",
}

# Response headers of git http-backend that are passed on to the client.
_PASSED_HEADERS = {
    "content-type",
    "cache-control",
    "expires",
    "pragma",
    "last-modified",
}


@dataclass(frozen=True, slots=True)
class CGIResponse:
    """A parsed CGI response: status, the headers passed on, and the body."""

    status: int
    headers: dict[str, str]
    body: bytes


@cache
def _http_backend() -> str:
    exec_path = subprocess.run(
        ["git", "--exec-path"], capture_output=True, check=True, text=True
    ).stdout.strip()
    return str(Path(exec_path) / "git-http-backend")


def _parse_cgi(output: bytes) -> CGIResponse:
    # CGI/1.1 (RFC 3875, section 6): header lines, a blank line, the body.
    # git http-backend ends its header lines with CRLF.
    for separator in (b"\r\n\r\n", b"\n\n"):
        head, found, body = output.partition(separator)
        if found:
            break
    else:
        raise RuntimeError("git http-backend wrote no header block")
    status = 200
    headers: dict[str, str] = {}
    for line in head.decode("latin-1").splitlines():
        name, _, value = line.partition(":")
        name = name.strip().lower()
        value = value.strip()
        if name == "status":
            status = int(value.split()[0])
        elif name in _PASSED_HEADERS:
            headers[name] = value
    return CGIResponse(status=status, headers=headers, body=body)


async def run_http_backend(
    *,
    project_root: Path,
    path_info: str,
    method: str,
    query_string: str,
    content_type: str,
    content_encoding: str | None,
    git_protocol: str | None,
    body: bytes,
) -> CGIResponse:
    """Run git http-backend for one request and return its parsed response.

    ``path_info`` is ``/owner/name.git/<service path>`` below
    ``project_root``. A gzip ``content_encoding`` is passed on, because
    http-backend inflates such a body itself. Raises RuntimeError when
    http-backend exits non-zero before writing a response. Cancellation
    kills the process.
    """
    env = git_environment(project_root)
    env.update(
        {
            "GIT_PROJECT_ROOT": str(project_root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REQUEST_METHOD": method,
            "PATH_INFO": path_info,
            "QUERY_STRING": query_string,
            "CONTENT_TYPE": content_type,
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": "x-access-token",
            "REMOTE_ADDR": "127.0.0.1",
            "GIT_CONFIG_COUNT": str(len(_UPLOAD_CONFIG)),
        }
    )
    for index, (key, value) in enumerate(_UPLOAD_CONFIG.items()):
        env[f"GIT_CONFIG_KEY_{index}"] = key
        env[f"GIT_CONFIG_VALUE_{index}"] = value
    if content_encoding:
        env["HTTP_CONTENT_ENCODING"] = content_encoding
    if git_protocol:
        env["HTTP_GIT_PROTOCOL"] = git_protocol

    result = await trio.run_process(
        [_http_backend()],
        stdin=body,
        capture_stdout=True,
        capture_stderr=True,
        env=env,
        check=False,
    )
    stderr = result.stderr.decode(errors="replace").strip()
    if stderr:
        log.info("git http-backend for %s wrote to stderr: %s", path_info, stderr)
    if result.returncode != 0 and not result.stdout:
        raise RuntimeError(
            f"git http-backend exited with {result.returncode} for {path_info!r}"
        )
    return _parse_cgi(result.stdout)
