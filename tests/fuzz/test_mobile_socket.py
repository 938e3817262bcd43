"""The /ws/pair/mobile/<session id>/ socket against odd paths, frames, origins and cookies.

Through the real ASGI application (origin check, session cookie, routing),
as tests/pairing/test_mobile_consumer.py does. Whatever arrives, the
application must never raise: a socket it does not serve is refused at the
handshake or closed with the page's own codes (4401, 4403), and only the
session's owner, on the site's origin, ever hears about the session.
"""

import json
import uuid
from typing import Any
from urllib.parse import urlsplit

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from hypothesis import given
from hypothesis import strategies as st

from archipelag.asgi import application
from islands.models import Island
from pairing.models import MobilePairingSession
from tests.fuzz import strategies as fuzz
from tests.fuzz.conftest import EXAMPLES_ONLY_READ, snapshot
from tests.pairing.test_mobile_consumer import cookie_for

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("fresh_channel_layer"),
]

ORIGIN = b"http://127.0.0.1:8000"


@pytest.fixture
def sockets(alice, bob):
    """Alice's live session and a session cookie for each persona."""
    session = MobilePairingSession.objects.open(alice).row
    return {
        "session": session,
        "path": f"/ws/pair/mobile/{session.id}/",
        "cookies": {"alice": cookie_for(alice).encode(), "bob": cookie_for(bob).encode(), "nobody": None},
    }


def communicator(path: str, origin: bytes | None = ORIGIN, cookie: bytes | None = None, headers=()):
    headers = list(headers)
    if origin is not None:
        headers.append((b"origin", origin))
    if cookie is not None:
        headers.append((b"cookie", cookie))
    socket = WebsocketCommunicator(application, "/", headers=headers)
    # The path as a server hands it over, already decoded, whatever it is:
    # the communicator's own URL parsing would refuse some of them first.
    socket.scope["path"] = path
    return socket


# How long the application may take to answer on a busy machine. Every wait
# ends as soon as its condition holds, so this bounds only a failing test.
DEADLINE = 10.0


async def first_answer(socket) -> tuple[bool, list[dict[str, Any]]]:
    """Connect; whether the handshake was accepted, and the one message that follows it.

    An accepted socket always hears exactly one thing first: the session's
    snapshot, or a close saying who may not watch it. A refused one, nothing.
    """
    connected, _ = await socket.connect(timeout=DEADLINE)
    if not connected:
        return False, []
    return True, [await socket.receive_output(timeout=DEADLINE)]


async def hang_up(socket) -> list[dict[str, Any]]:
    """Close the socket, wait for the application to end, and return what else it sent.

    The application handles its input in order, so once it has ended it has
    handled everything sent before the close: what is queued then is all it
    will ever send. Raises what the application raised.
    """
    await socket.send_input({"type": "websocket.disconnect", "code": 1000})
    await socket.wait(timeout=DEADLINE)
    rest = []
    while not socket.output_queue.empty():
        rest.append(socket.output_queue.get_nowait())
    return rest


async def session_is_untouched(session) -> None:
    fresh = await MobilePairingSession.objects.aget(pk=session.pk)
    assert (fresh.used_at, fresh.retired_at, fresh.island_id) == (None, None, None)
    assert not await Island.objects.filter(kind=Island.Kind.MOBILE).aexists()


def is_snapshot_of(message: dict[str, Any], session) -> bool:
    if message.get("type") != "websocket.send":
        return False
    snapshot = json.loads(message["text"])
    return bool(snapshot["session_id"] == str(session.id) and snapshot["state"] == "waiting")


def uuid_variants(value: uuid.UUID) -> list[str]:
    return [
        str(value).upper(),
        value.hex,
        f"{{{value}}}",
        f"urn:uuid:{value}",
        str(value) + "\n",
        str(uuid.uuid4()),
    ]


@EXAMPLES_ONLY_READ
@given(data=st.data())
async def test_any_path_is_served_or_refused_without_raising(sockets, data):
    session = sockets["session"]
    segment = st.one_of(fuzz.odd_text(), st.sampled_from(uuid_variants(session.id)))
    path = data.draw(
        st.one_of(
            fuzz.odd_text(),
            st.builds("/ws/pair/mobile/{}/".format, segment),
            st.builds(
                "{}{}".format,
                st.sampled_from(["", "/", "//", "/ws/pair/mobile/../"]),
                st.just(sockets["path"][1:]),
            ),
            st.builds("{}{}".format, st.just(sockets["path"]), fuzz.odd_text(max_size=10)),
        ),
        label="path",
    )
    socket = communicator(path, cookie=sockets["cookies"]["alice"])
    connected, received = await first_answer(socket)
    received += await hang_up(socket)  # raises what the application raised, if anything
    if connected:
        # Routed to the consumer: the owner's own session, or "not yours".
        assert len(received) == 1, received
        if is_snapshot_of(received[0], session):
            assert path.lstrip("/") == sockets["path"][1:]
        else:
            assert received[0] == {"type": "websocket.close", "code": 4403}
    else:
        assert received == []


def frames() -> st.SearchStrategy[dict[str, Any]]:
    text = st.one_of(fuzz.odd_text(), fuzz.json_bodies.map(lambda body: body.decode()), st.just(""))
    return st.one_of(
        st.builds(lambda value: {"type": "websocket.receive", "text": value}, text),
        st.builds(lambda value: {"type": "websocket.receive", "bytes": value}, st.binary(max_size=64)),
    )


@EXAMPLES_ONLY_READ
@given(who=st.sampled_from(["alice", "bob", "nobody"]), sent=st.lists(frames(), min_size=1, max_size=5))
async def test_frames_from_the_client_are_ignored(sockets, who, sent):
    session = sockets["session"]
    socket = communicator(sockets["path"], cookie=sockets["cookies"][who])
    connected, first = await first_answer(socket)
    assert connected
    if who == "alice":
        assert len(first) == 1 and is_snapshot_of(first[0], session), first
    else:
        assert first == [{"type": "websocket.close", "code": 4401 if who == "nobody" else 4403}]
    for frame in sent:
        await socket.send_input(frame)
    assert await hang_up(socket) == []
    await session_is_untouched(session)


ODD_ORIGINS = [
    ORIGIN,
    b"http://localhost:8000",
    b"http://[::1]:8000",
    b"HTTP://LOCALHOST",
    b"https://evil.example",
    b"http://127.0.0.1.evil.example",
    b"http://evil.example#@127.0.0.1",
    b"null",
    b"",
    b"http://[::1",  # urlparse raises "Invalid IPv6 URL"
    b"http://127.0.0.1:99999",  # .port raises "out of range"
    b"http://127.0.0.1:port",  # .port raises "could not be cast to integer"
    b"http://127.0.0.1:-1",
    b"//127.0.0.1",
    b"127.0.0.1",
    b"file:///etc/passwd",
    b"http://127.0.0.1\x00.evil.example",
    b"http://\xff\xfe/",
]


def allowed(origin: bytes) -> bool:
    """The site's own origin, PUBLIC_URL's: its scheme, host and port."""
    try:
        parts = urlsplit(origin.decode("latin-1"))
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
        return (parts.scheme, parts.hostname, port) == ("http", "127.0.0.1", 8000)
    except ValueError:
        return False


@EXAMPLES_ONLY_READ
@given(
    origins=st.one_of(
        st.lists(st.sampled_from(ODD_ORIGINS), min_size=1, max_size=2),
        st.lists(
            st.one_of(st.binary(max_size=40), fuzz.header_text().map(lambda text: text.encode("latin-1"))),
            max_size=2,
        ),
    )
)
async def test_any_origin_is_judged_without_raising(sockets, origins):
    await judge(sockets, origins)


@pytest.mark.parametrize("origin", ODD_ORIGINS)
async def test_each_odd_origin_is_judged_without_raising(sockets, origin):
    """Not random: each of the origins above, which random draws reach only now and then."""
    await judge(sockets, [origin])


async def judge(sockets, origins: list[bytes]) -> None:
    socket = communicator(
        sockets["path"],
        origin=None,
        cookie=sockets["cookies"]["alice"],
        headers=[(b"origin", value) for value in origins],
    )
    connected, received = await first_answer(socket)
    received += await hang_up(socket)
    if connected:
        # Channels reads the last Origin header; only the site's own hosts pass.
        assert origins and allowed(origins[-1]), origins
        assert len(received) == 1 and is_snapshot_of(received[0], sockets["session"]), received
    else:
        assert received == []


@EXAMPLES_ONLY_READ
@given(data=st.data())
async def test_any_cookie_is_someone_or_nobody_without_raising(sockets, data):
    name = django_settings.SESSION_COOKIE_NAME.encode()
    cookie = data.draw(
        st.one_of(
            st.binary(max_size=80),
            fuzz.header_text().map(lambda text: text.encode("latin-1")),
            st.builds(lambda value: name + b"=" + value, st.binary(max_size=40)),
            st.builds(lambda value: name + b"=" + value.encode("latin-1"), fuzz.header_text()),
            st.sampled_from(list(filter(None, sockets["cookies"].values()))).map(
                lambda real: real + b"; " + name + b"=x"
            ),
            st.sampled_from([name + b"=\x00" * 32, name + b"=" + b"a" * 4096, b";;;", b"=" * 10]),
        ),
        label="cookie",
    )
    before = await database_sync_to_async(snapshot)()
    socket = communicator(sockets["path"], cookie=cookie)
    connected, received = await first_answer(socket)
    assert connected
    received += await hang_up(socket)
    assert len(received) == 1, received
    # Only Alice's own session cookie (which a forged one cannot be) hears the session.
    assert received[0] in (
        {"type": "websocket.close", "code": 4401},
        {"type": "websocket.close", "code": 4403},
    )
    assert await database_sync_to_async(snapshot)() == before
