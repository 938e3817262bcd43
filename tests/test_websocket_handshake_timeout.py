"""A websocket handshake the application is too slow to accept is told to retry (503), never 403.

daphne's own protocol answers such a handshake 403 "Access denied" and
logs a traceback when the application accepts it late; archipelag.server's
does neither (docs/performance.md, the burst after a mass disconnect).
"""

import base64
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import BASE_DIR, _free_port, _reachable
from tests.slow_websocket_asgi import ACCEPT_AFTER


def _handshake(port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /ws/slow/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=ACCEPT_AFTER + 10) as sock:
        sock.sendall(request.encode())
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n", 1)[0]


def test_a_handshake_not_accepted_in_time_gets_503_and_a_late_accept_logs_no_traceback(tmp_path: Path):
    port = _free_port()
    log = tmp_path / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "archipelag.server",
                "--websocket_connect_timeout",
                "1",
                "-e",
                f"tcp:port={port}:interface=127.0.0.1",
                "tests.slow_websocket_asgi:application",
            ],
            cwd=BASE_DIR,
            env={**os.environ, "DJANGO_SETTINGS_MODULE": "archipelag.settings"},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while not _reachable(f"http://127.0.0.1:{port}", port):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        status_line = _handshake(port)
        # The application accepts after the refusal: that late accept must be dropped quietly.
        time.sleep(ACCEPT_AFTER + 1)
    finally:
        process.terminate()
        process.wait(10)
    output = log.read_text(errors="replace")
    assert status_line.startswith(b"HTTP/1.1 503"), (status_line, output)
    assert "Traceback" not in output, output
    assert "event=websocket_handshake_timeout path=/ws/slow/" in output
