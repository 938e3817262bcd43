"""daphne with request bodies bounded while they arrive: `python -m archipelag.server`.

Twisted reads a request's whole body (to a temporary file past 100 kB)
before daphne calls the ASGI application, so a limit in Django or in an
ASGI middleware comes after the memory and disk are spent: a 1 GB POST to
/api/v1/ping was read whole. Here the request class daphne's Twisted server
builds checks the body as it comes: an over-long Content-Length is answered
413 as soon as the headers end, before a byte of the body is read, and a
chunked body is stopped at the limit. Bodies under the limit are kept in
memory, never in a temporary file.

The limits per path are those the JSON views check again after reading
(docs/api.md): 16 KiB for the API, 64 KiB for heartbeats, 128 KiB for job
submissions; pages and the admin take PAGE_MAX_BODY_BYTES.

Run it as daphne is run; it takes daphne's arguments:

    python -m archipelag.server -e tcp:port=8000:interface=0.0.0.0:backlog=1024 archipelag.asgi:application

`manage.py runserver` serves with it too (archipelag/management/commands/runserver.py).
"""

import logging
from io import BytesIO
from typing import Any, cast
from urllib.parse import unquote, urlsplit

# daphne.server installs Twisted's asyncio reactor; it must be imported
# before anything that imports twisted.internet.reactor.
from daphne.server import Server as DaphneServer  # isort: split

from autobahn.websocket.types import ConnectionDeny
from daphne.cli import CommandLineInterface as DaphneCommandLineInterface
from daphne.http_protocol import HTTPFactory, WebRequest
from daphne.ws_protocol import WebSocketFactory, WebSocketProtocol
from twisted.internet import reactor
from twisted.internet.base import ReactorBase

from archipelag.api import DEFAULT_MAX_BODY_BYTES
from islands.agent import HEARTBEAT_MAX_BODY_BYTES, JOB_SUBMISSION_MAX_BYTES

# Forms are a few hundred bytes; the largest is an admin action over a
# changelist's every row (Django's 1,000 fields of about 50 bytes each).
# settings.DATA_UPLOAD_MAX_MEMORY_SIZE says the same to Django.
PAGE_MAX_BODY_BYTES = 256 * 1024

# API paths whose bodies may be larger than DEFAULT_MAX_BODY_BYTES. Exact
# paths: a path spelt any other way gets the smaller limit, never a larger one.
API_BODY_LIMITS = {
    "/api/v1/islands/heartbeat": HEARTBEAT_MAX_BODY_BYTES,
    "/api/v1/jobs": JOB_SUBMISSION_MAX_BYTES,
}

# How long a refused connection stays open, unread, after its 413, before
# it is closed. Closing a socket with unread data sends a reset, which can
# destroy the 413 before the client reads it; a client that reads while it
# sends (curl, browsers, proxies) has it well within this time.
REFUSED_LINGER_SECONDS = 2.0

logger = logging.getLogger("archipelag.server")


def body_limit(target: bytes) -> int:
    """The largest body, in bytes, a request for `target` (the request line's URI) may carry."""
    path = unquote(urlsplit(target.decode("latin-1")).path)
    if path.startswith("/api/"):
        return API_BODY_LIMITS.get(path, DEFAULT_MAX_BODY_BYTES)
    return PAGE_MAX_BODY_BYTES


def _too_large_response(target: bytes, limit: int) -> bytes:
    if target.startswith(b"/api/"):
        content_type = b"application/json"
        body = b'{"success": false, "error": "body too large: at most %d bytes"}' % limit
    else:
        content_type = b"text/plain; charset=utf-8"
        body = b"Request body too large: at most %d bytes.\n" % limit
    return (
        b"HTTP/1.1 413 Content Too Large\r\n"
        b"Content-Type: " + content_type + b"\r\n"
        b"Content-Length: %d\r\n"
        b"Connection: close\r\n"
        b"\r\n" % len(body)
    ) + body


def _discard(data: bytes) -> None:
    pass


class BodyLimitedRequest(WebRequest):
    """daphne's request, refusing a body over its path's limit before it is stored.

    Twisted calls gotLength when the headers have ended (with the declared
    Content-Length, or None for a chunked body), then handleContentChunk for
    each piece of the body, then requestReceived, which makes daphne call
    the application.
    """

    _limit = 0
    _received = 0
    _refused = False

    def gotLength(self, length: int | None) -> None:
        # The request line is parsed (the channel holds it) but not yet
        # copied onto the request.
        self._target = self.channel._path
        self._limit = body_limit(self._target)
        if length is not None and length > self._limit:
            # Refused before the body: no "100 Continue" is sent for it.
            self.requestHeaders.removeHeader(b"Expect")
            self._refuse(f"content_length={length}")
            return
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._refuse(f"received={self._received}")
            return
        self.content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def _refuse(self, detail: str) -> None:
        """Answer 413, read nothing more, and close the connection shortly after."""
        self._refused = True
        self.content = BytesIO()
        channel = self.channel
        transport = channel.transport
        logger.warning(
            "event=body_too_large path=%s limit=%d %s",
            urlsplit(self._target.decode("latin-1")).path,
            self._limit,
            detail,
        )
        # The rest of what arrives on this connection is dropped unparsed,
        # and none is read from the socket: the sender is held back by TCP.
        channel.dataReceived = _discard
        transport.pauseProducing()
        transport.write(_too_large_response(self._target, self._limit))
        transport.loseWriteConnection()
        cast(ReactorBase, reactor).callLater(REFUSED_LINGER_SECONDS, transport.loseConnection)


class BodyLimitedHTTPFactory(HTTPFactory):
    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        protocol.requestFactory = BodyLimitedRequest
        return protocol


class PatientWebSocketProtocol(WebSocketProtocol):
    """daphne's websocket protocol, telling a handshake it was too slow rather than forbidden.

    daphne ends a handshake the application has not accepted within
    --websocket_connect_timeout (5 s) with serverReject(), a 403 "Access
    denied": after a mass disconnect, a page whose handshake merely queued
    was told it is not allowed (docs/performance.md). Here it gets 503: try
    again. And when the application accepts such a handshake after all, the
    late accept is dropped quietly; daphne raised AttributeError on it (its
    handshake is gone) and logged a traceback.
    """

    def check_timeouts(self) -> None:
        if self.state == self.STATE_CONNECTING and self.duration() > self.server.websocket_connect_timeout:
            self._refuse_as_busy()
            return
        super().check_timeouts()

    def _refuse_as_busy(self) -> None:
        if not hasattr(self, "handshake_deferred"):
            return
        busy = ConnectionDeny(code=503, reason="Service Unavailable")  # type: ignore[no-untyped-call]
        self.handshake_deferred.errback(busy)
        del self.handshake_deferred
        self.server.protocol_disconnected(self)
        logger.warning("event=websocket_handshake_timeout path=%s", self.request.path)

    def serverAccept(self, subprotocol: str | None = None) -> None:
        if not hasattr(self, "handshake_deferred"):
            return
        super().serverAccept(subprotocol)

    def serverReject(self) -> None:
        if not hasattr(self, "handshake_deferred"):
            return
        super().serverReject()


# daphne looks for handshakes past --websocket_connect_timeout every 2 s.
TIMEOUT_CHECK_PERIOD = 2.0


class PatientWebSocketFactory(WebSocketFactory):
    """daphne's websocket factory, building PatientWebSocketProtocol.

    daphne's command line gives autobahn's own handshake timeout the same
    value as its connect timeout. autobahn's, when it comes first, drops the
    TCP connection without an answer (the burst's "connection errors" in
    docs/performance.md); it is moved past daphne's next check, so a slow
    handshake is answered 503 instead.
    """

    protocol = PatientWebSocketProtocol

    def setProtocolOptions(self, *args: Any, **options: Any) -> None:
        timeout = options.get("openHandshakeTimeout")
        if timeout:
            options["openHandshakeTimeout"] = timeout + TIMEOUT_CHECK_PERIOD + 1
        super().setProtocolOptions(*args, **options)


class Server(DaphneServer):
    """daphne's server: BodyLimitedRequest for HTTP requests, PatientWebSocketProtocol for sockets."""

    @property
    def ws_factory(self) -> WebSocketFactory:
        return self._ws_factory

    @ws_factory.setter
    def ws_factory(self, factory: WebSocketFactory) -> None:
        # Built as daphne's run() builds its own.
        self._ws_factory = PatientWebSocketFactory(self, server=self.server_name)

    # daphne's run() builds its HTTP factory and listens with it at once, so
    # the factory is replaced as run() stores it.
    @property
    def http_factory(self) -> HTTPFactory:
        return self._http_factory

    @http_factory.setter
    def http_factory(self, factory: HTTPFactory) -> None:
        self._http_factory = BodyLimitedHTTPFactory(self)


class CommandLineInterface(DaphneCommandLineInterface):
    server_class = Server


if __name__ == "__main__":
    CommandLineInterface.entrypoint()
