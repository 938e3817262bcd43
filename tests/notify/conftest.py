"""Real servers for the notification tests: an SMTP server (the mailbox) and an HTTP webhook receiver."""

import email
import email.policy
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from tests.conftest import _free_port


@dataclass
class Mailbox:
    host: str
    port: int
    messages: list[EmailMessage] = field(default_factory=list)
    # Seconds each DATA command takes: a slow mail server, for the kill test.
    delay: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay:
            time.sleep(self.delay)
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self.lock:
            self.messages.append(message)
        return "250 Message accepted for delivery"

    def ids(self) -> list[str]:
        with self.lock:
            return [str(message["Message-ID"]) for message in self.messages]

    def to(self, address: str) -> list[EmailMessage]:
        with self.lock:
            return [message for message in self.messages if address in str(message["To"])]

    def env(self) -> dict[str, str]:
        return {"EMAIL_HOST": self.host, "EMAIL_PORT": str(self.port)}


@pytest.fixture
def mailbox(settings: Any) -> Iterator[Mailbox]:
    """An aiosmtpd server on a free port; this process's mail goes to it over SMTP."""
    box = Mailbox(host="127.0.0.1", port=_free_port())
    controller = Controller(box, hostname=box.host, port=box.port)
    controller.start()
    settings.MAILERS = {
        "default": {
            "BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "OPTIONS": {"host": box.host, "port": box.port, "timeout": 10},
        }
    }
    yield box
    controller.stop()


def body(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


@dataclass
class Receiver:
    """A local HTTP receiver: answers with the statuses queued (then 200), records what arrived."""

    answers: list[int] = field(default_factory=list)
    delay: float = 0.0
    requests: list[tuple[dict[str, str], bytes, str]] = field(default_factory=list)
    url: str = ""

    def ids(self):
        return [headers["webhook-id"] for headers, _, _ in self.requests]


@pytest.fixture
def receiver(settings):
    settings.WEBHOOKS_ALLOW_PRIVATE = True
    box = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            data = self.rfile.read(int(self.headers["Content-Length"]))
            box.requests.append(({k.lower(): v for k, v in self.headers.items()}, data, self.path))
            if box.delay:
                time.sleep(box.delay)
            status = box.answers.pop(0) if box.answers else 200
            self.send_response(status)
            if status in (301, 302, 307, 308):
                self.send_header("Location", f"{box.url}/elsewhere")
            self.end_headers()
            self.wfile.write(b"ok" if status < 300 else b"nope")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    box.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield box
    server.shutdown()
    server.server_close()
