"""Request bodies are bounded while they arrive, under the real server (archipelag/server.py).

Each test runs the server the Dockerfile runs, in its own process, and
talks to it over a raw socket, so what is sent, and when, is the test's.
"""

import json
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import LiveServer

GB = 1_000_000_000
MB = 1024 * 1024


def _address(server: LiveServer) -> tuple[str, int]:
    parts = urlsplit(server.url)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


def _rss_bytes(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for process {pid}")


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The status, headers and body of the one response on `sock` (up to its Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    fields = (line.partition(":") for line in header_lines)
    headers = {name.lower(): value.strip() for name, _, value in fields}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), headers, body


def _request_head(server: LiveServer, path: str, headers: dict[str, str]) -> bytes:
    host, port = _address(server)
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _post(server: LiveServer, path: str, body: bytes, **headers: str) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(_address(server), timeout=10) as sock:
        sock.sendall(_request_head(server, path, {"Content-Length": str(len(body)), **headers}) + body)
        return _read_response(sock)


class _Upload:
    """Sends `GB` zero bytes after a request head, from a thread, until the server stops reading."""

    def __init__(self, sock: socket.socket, chunked: bool):
        self.sock = sock
        self.chunked = chunked
        self.sent = 0
        self.thread = threading.Thread(target=self._send, daemon=True)

    def _send(self) -> None:
        piece = b"\0" * MB
        if self.chunked:
            piece = b"%x\r\n" % len(piece) + piece + b"\r\n"
        try:
            while self.sent < GB:
                self.sock.sendall(piece)
                self.sent += MB
        except OSError:
            pass  # The server closed the connection: what the test expects.


@pytest.mark.parametrize(
    ("path", "chunked"),
    [("/api/v1/ping", False), ("/api/v1/islands/heartbeat", True), ("/accounts/login/", False)],
    ids=["content-length", "chunked", "page"],
)
def test_a_1_gb_upload_is_refused_within_a_second_and_the_server_grows_by_at_most_a_few_mb(
    daphne_server: LiveServer, path: str, chunked: bool
):
    pid = daphne_server.process.pid
    assert _post(daphne_server, "/api/v1/ping", b"{}")[0] == 200  # Django is loaded.
    rss_before = _rss_bytes(pid)

    with socket.create_connection(_address(daphne_server), timeout=5) as sock:
        length = {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(GB)}
        sock.sendall(_request_head(daphne_server, path, length))
        upload = _Upload(sock, chunked)
        started = time.monotonic()
        upload.thread.start()
        status, headers, body = _read_response(sock)
        answered_in = time.monotonic() - started
        upload.thread.join(timeout=10)

    assert status == 413
    assert answered_in < 1.0
    assert headers["connection"] == "close"
    if path.startswith("/api/"):
        limit = 65536 if "heartbeat" in path else 16384
        assert json.loads(body) == {"success": False, "error": f"body too large: at most {limit} bytes"}
    # The server stopped reading: what was sent sits in socket buffers.
    assert upload.sent < 100 * MB
    assert _rss_bytes(pid, "VmHWM") - rss_before < 5 * MB
    # It still serves.
    assert _post(daphne_server, "/api/v1/ping", b"{}")[0] == 200


def test_each_path_has_its_limit_and_bodies_under_it_reach_the_app(daphne_server: LiveServer):
    cases = [
        # (path, body size, the status the client sees)
        ("/api/v1/islands/pairing", 16 * 1024, 400),  # not JSON: the view read it
        ("/api/v1/islands/pairing", 16 * 1024 + 1, 413),
        ("/api/v1/mobile/pair", 16 * 1024 + 1, 413),
        ("/api/v1/islands/heartbeat", 64 * 1024, 401),  # no token: the view read it
        ("/api/v1/islands/heartbeat", 64 * 1024 + 1, 413),
        ("/api/v1/jobs", 128 * 1024, 401),
        ("/api/v1/jobs", 128 * 1024 + 1, 413),
        ("/api/v1/jobs/j1/cancel", 16 * 1024 + 1, 413),
        # A path spelt another way gets the smaller limit, never a larger one.
        ("/api/v1/islands//heartbeat", 16 * 1024 + 1, 413),
        ("/accounts/login/", 256 * 1024, 403),  # no CSRF token: Django read it
        ("/accounts/login/", 256 * 1024 + 1, 413),
    ]
    seen = [(path, size, _post(daphne_server, path, b" " * size)[0]) for path, size, _ in cases]
    assert seen == cases


def test_an_over_long_body_is_refused_before_100_continue(daphne_server: LiveServer):
    with socket.create_connection(_address(daphne_server), timeout=5) as sock:
        head = {"Content-Length": str(GB), "Expect": "100-continue"}
        sock.sendall(_request_head(daphne_server, "/api/v1/islands/pairing", head))
        assert _read_response(sock)[0] == 413
        assert sock.recv(100) == b""  # nothing follows: no "100 Continue", and the server closed


def test_a_chunked_body_under_the_limit_reaches_the_app(daphne_server: LiveServer):
    body = b'{"host_id": "x"}'
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    with socket.create_connection(_address(daphne_server), timeout=5) as sock:
        head = {"Transfer-Encoding": "chunked"}
        sock.sendall(_request_head(daphne_server, "/api/v1/islands/pairing", head))
        sock.sendall(chunked)
        status, _, answer = _read_response(sock)
    assert status == 400
    assert "host_id" in json.loads(answer)["error"]
