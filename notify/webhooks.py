"""Webhooks: signing secrets kept encrypted, requests signed per Standard Webhooks, sent only where allowed.

Signing (https://www.standardwebhooks.com): the body is signed with
HMAC-SHA256 over `{webhook-id}.{webhook-timestamp}.{body}` with the
endpoint's secret (`whsec_` and base64), sent as `webhook-signature: v1,<base64>`.
The webhook-id is the delivery's message id: the same on every retry, so
receivers de-duplicate.

The secret is the one secret here that must be recoverable (we sign with
it), so it is stored encrypted (NaCl's SecretBox: XSalsa20-Poly1305) with a
key derived from SECRET_KEY; keys derived from SECRET_KEY_FALLBACKS still
decrypt, so rotating SECRET_KEY keeps endpoints working.
"""

import base64
import hashlib
import hmac
import http.client
import ipaddress
import json
import secrets
import socket
import ssl
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import nacl.exceptions
import nacl.secret
from django.conf import settings
from django.utils.crypto import salted_hmac

SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix, not a secret)
SECRET_BYTES = 24
TIMEOUT = 10.0
KEY_SALT = "notify.webhooks.secret-key"
USER_AGENT = "Archipelag.io-Webhooks/1"
# How much of a receiver's answer is kept with a delivery, to show why it failed.
ANSWER_KEPT = 200


class WebhookRefused(Exception):
    """The URL may not be sent to (scheme, address), or the receiver did not take it."""


# --- Secrets ------------------------------------------------------------------------


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def _box(secret_key: str) -> nacl.secret.SecretBox:
    key = salted_hmac(KEY_SALT, "webhook signing secrets", secret=secret_key, algorithm="sha256").digest()
    return nacl.secret.SecretBox(key)


def encrypt_secret(secret: str) -> str:
    return base64.b64encode(_box(settings.SECRET_KEY).encrypt(secret.encode())).decode()


def decrypt_secret(stored: str) -> str:
    """The endpoint's secret, decrypted with SECRET_KEY or, after a rotation, one of its fallbacks."""
    sealed = base64.b64decode(stored)
    for key in [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", [])]:
        try:
            return _box(key).decrypt(sealed).decode()
        except nacl.exceptions.CryptoError:
            continue
    raise WebhookRefused("the signing secret cannot be decrypted with SECRET_KEY or its fallbacks")


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    digest = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


# --- Where webhooks may go ------------------------------------------------------------


def check_url(url: str) -> str | None:
    """Why this URL cannot be an endpoint, or None. Addresses are checked again at each send."""
    parts = urlsplit(url)
    allow_private = settings.WEBHOOKS_ALLOW_PRIVATE
    if parts.scheme != "https" and not (allow_private and parts.scheme == "http"):
        return "Webhook URLs must start with https://."
    if not parts.hostname:
        return "This URL names no host."
    if parts.username or parts.password:
        return "Put no user name or password in the URL; check the signature instead."
    try:
        parts.port  # noqa: B018 (raises on a port out of range)
    except ValueError:
        return "This URL's port is not a number from 1 to 65535."
    try:
        address = ipaddress.ip_address(parts.hostname)
    except ValueError:
        return None  # a name: resolved, and checked, when sending
    if not allow_private and not _public(address):
        return "Webhooks cannot go to loopback, private or link-local addresses."
    return None


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def resolve(host: str, port: int) -> str:
    """The address to connect to: every address the name has must be public (unless allowed)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise WebhookRefused(f"cannot resolve {host}: {exc}") from exc
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not addresses:
        raise WebhookRefused(f"{host} has no address")
    if not settings.WEBHOOKS_ALLOW_PRIVATE:
        refused = [str(address) for address in addresses if not _public(address)]
        if refused:
            raise WebhookRefused(
                f"{host} resolves to a loopback, private or link-local address ({refused[0]})"
            )
    return str(addresses[0])


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to the address that was checked, verifying the certificate for the URL's host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Plain HTTP (only with WEBHOOKS_ALLOW_PRIVATE) to the address that was checked."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


@dataclass(frozen=True)
class Answer:
    status: int
    text: str


def post(url: str, body: bytes, headers: dict[str, str], timeout: float | None = None) -> Answer:
    """POST once: resolve now, connect to the checked address, follow no redirect.

    Raises WebhookRefused for a URL that may not be sent to and for any
    answer but 2xx (a redirect is an answer like any other: not followed).
    """
    problem = check_url(url)
    if problem:
        raise WebhookRefused(problem)
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = resolve(host, port)
    connection_class = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
    connection = connection_class(host, port, address, timeout or TIMEOUT)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        connection.request(
            "POST",
            path,
            body=body,
            headers={**headers, "Content-Type": "application/json", "User-Agent": USER_AGENT},
        )
        response = connection.getresponse()
        text = response.read(ANSWER_KEPT).decode(errors="replace")
    finally:
        connection.close()
    if not 200 <= response.status < 300:
        raise WebhookRefused(f"HTTP {response.status} {response.reason}: {text[:ANSWER_KEPT]}".strip())
    return Answer(response.status, text)


def payload(kind: str, created_at: datetime, data: dict[str, Any]) -> bytes:
    """The JSON body: {"type", "timestamp", "data"}."""
    stamp = created_at.isoformat().replace("+00:00", "Z")
    return json.dumps({"type": kind, "timestamp": stamp, "data": data}, separators=(",", ":")).encode()


def signed_headers(secret: str, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, message_id, timestamp, body),
    }
