"""Signed-in browsers watching their mobile pairing sessions, for the websocket benchmarks.

Each browser is a user with a Django session (the cookie a login would set)
and an open mobile pairing session of their own, whose code and QR secret a
simulated phone can redeem. Rows are inserted in bulk: seeding is not what
is measured, and 10,000 logins or page loads would take minutes here.
"""

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bench import common


@dataclass
class Browser:
    user_id: int
    cookie: str
    session_id: str
    code: str
    secret: str


def seed_browsers(count: int, prefix: str = "bench") -> list[Browser]:
    """`count` users, each signed in and showing /pair/mobile with a live session."""
    from django.conf import settings
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.auth.hashers import make_password
    from django.contrib.auth.models import User
    from django.contrib.sessions.backends.db import SessionStore
    from django.contrib.sessions.models import Session
    from django.utils import timezone
    from django.utils.crypto import get_random_string

    from archipelag.secrets import generate_secret, hash_secret
    from pairing.codes import generate_code, hash_code
    from pairing.models import CODE_TTL, MobilePairingSession

    now = timezone.now()
    # One unusable password hash for all: hashing 10,000 would take minutes.
    password = make_password(None)
    users = User.objects.bulk_create(
        [User(username=f"{prefix}{n:05d}", password=password) for n in range(count)], batch_size=2000
    )
    store = SessionStore()
    cookies: list[str] = []
    rows: list[Session] = []
    for user in users:
        key = get_random_string(32, "abcdefghijklmnopqrstuvwxyz0123456789")
        data = {
            SESSION_KEY: str(user.pk),
            BACKEND_SESSION_KEY: settings.AUTHENTICATION_BACKENDS[0],
            HASH_SESSION_KEY: user.get_session_auth_hash(),
        }
        rows.append(
            Session(session_key=key, session_data=store.encode(data), expire_date=now + CODE_TTL * 12)
        )
        cookies.append(f"{settings.SESSION_COOKIE_NAME}={key}")
    Session.objects.bulk_create(rows, batch_size=2000)

    # Codes must be unique among live ones; drawing them here as a set keeps
    # the bulk insert from tripping the unique index.
    codes: set[str] = set()
    while len(codes) < count:
        codes.add(generate_code())
    secrets = [generate_secret() for _ in range(count)]
    sessions = MobilePairingSession.objects.bulk_create(
        [
            MobilePairingSession(
                owner=user,
                code_hash=hash_code(code),
                scan_secret_hash=hash_secret(secret),
                created_at=now,
                expires_at=now + CODE_TTL,
            )
            for user, code, secret in zip(users, codes, secrets, strict=True)
        ],
        batch_size=2000,
    )
    return [
        Browser(user.pk, cookie, str(session.id), code, secret)
        for user, cookie, session, code, secret in zip(users, cookies, sessions, codes, secrets, strict=True)
    ]


@dataclass
class Sockets:
    """Open websockets and what happened to them."""

    open: list[Any] = field(default_factory=list)
    failed: dict[str, int] = field(default_factory=dict)
    # Close codes of sockets the server closed while they were meant to stay open.
    closed: dict[int, int] = field(default_factory=dict)
    first_messages: dict[str, int] = field(default_factory=dict)
    # Handshakes dropped and then tried again (see open_sockets' retries).
    dropped: dict[str, int] = field(default_factory=dict)
    connect_seconds: float = 0.0
    readers: list["asyncio.Task[None]"] = field(default_factory=list)
    # Messages after the first, per socket index: (arrival time, message).
    inbox: dict[int, "asyncio.Queue[tuple[float, dict[str, Any]]]"] = field(default_factory=dict)

    def fail(self, reason: str) -> None:
        self.failed[reason] = self.failed.get(reason, 0) + 1


async def open_sockets(
    session: Any,
    urls: Iterable[tuple[int, str, dict[str, str]]],
    into: Sockets,
    concurrency: int,
    retries: int = 0,
) -> None:
    """Open a websocket per (index, url, headers), `concurrency` handshakes at a time.

    A handshake the server drops is tried again `retries` times, a second
    apart, as the page's script reconnects; those count in `dropped`, and
    only a socket that never opened counts as failed.

    Each socket counts as open once its first message (the snapshot) has
    arrived: only then has its consumer joined the group. A reader then
    watches it until the end, counting closes the client did not ask for.
    """
    import aiohttp

    gate = asyncio.Semaphore(concurrency)

    async def one(index: int, url: str, headers: dict[str, str]) -> None:
        for attempt in range(retries + 1):
            if attempt:
                # As the page does: reconnect after a pause.
                await asyncio.sleep(1)
            async with gate:
                try:
                    ws = await session.ws_connect(url, headers=headers, autoping=True, heartbeat=None)
                except aiohttp.WSServerHandshakeError as exc:
                    # 403 from daphne: the application did not accept in time.
                    reason = f"handshake {exc.status}"
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    # A reset: autobahn drops a handshake not served within
                    # daphne's --websocket_connect_timeout (5 s).
                    reason = type(exc).__name__
                else:
                    break
            if attempt < retries:
                into.dropped[reason] = into.dropped.get(reason, 0) + 1
            else:
                into.fail(reason)
                return
        try:
            message = await asyncio.wait_for(ws.receive(), timeout=30)
        except TimeoutError:
            into.fail("no snapshot within 30 s")
            await ws.close()
            return
        if message.type != aiohttp.WSMsgType.TEXT:
            into.fail(f"closed {ws.close_code} before its snapshot")
            return
        state = message.json().get("state", "?")
        into.first_messages[state] = into.first_messages.get(state, 0) + 1
        into.open.append(ws)
        into.inbox[index] = asyncio.Queue()
        into.readers.append(asyncio.ensure_future(_read(ws, index, into)))

    started = time.perf_counter()
    await asyncio.gather(*(one(index, url, headers) for index, url, headers in urls))
    into.connect_seconds += time.perf_counter() - started


async def _read(ws: Any, index: int, into: Sockets) -> None:
    import aiohttp

    async for message in ws:
        if message.type == aiohttp.WSMsgType.TEXT:
            into.inbox[index].put_nowait((time.perf_counter(), message.json()))
    if not getattr(ws, "bench_closing", False):
        code = ws.close_code or 0
        into.closed[code] = into.closed.get(code, 0) + 1


async def close_all(into: Sockets) -> None:
    for ws in into.open:
        ws.bench_closing = True
    await asyncio.gather(*(ws.close() for ws in into.open), return_exceptions=True)
    for reader in into.readers:
        reader.cancel()
    await asyncio.gather(*into.readers, return_exceptions=True)


def client_session() -> Any:
    """One aiohttp session for thousands of sockets: no connection limit, no shared cookie jar."""
    import aiohttp

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None, connect=60),
    )
    # aiohttp quietly retries a GET once when the server drops the connection;
    # a handshake the server dropped must count as failed, not be hidden.
    session._retry_connection = False
    return session


def browser_headers(server: common.Daphne, browser: Browser) -> dict[str, str]:
    return {"Cookie": browser.cookie, "Origin": server.url}
