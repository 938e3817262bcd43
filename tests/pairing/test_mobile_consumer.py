"""The /ws/pair/mobile/<session id>/ socket, through the real ASGI stack.

These go through archipelag.asgi.application (origin check, session cookie,
routing) with Channels' WebsocketCommunicator. The consumer reads the database
from another thread, so the tests commit (transaction=True), as Channels'
docs advise.
"""

from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.db import connection, transaction
from django.test import Client

from archipelag.asgi import application
from islands.models import Island
from pairing.consumers import MobilePairingConsumer
from pairing.models import MobilePairingSession
from tests.pairing.conftest import PHONE_HOST_ID, device, pair_phone

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("fresh_channel_layer"),
]

ORIGIN = "http://127.0.0.1:8000"


def cookie_for(user) -> str:
    client = Client()
    client.force_login(user)
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"


@pytest.fixture
def alice_cookie(alice):
    return cookie_for(alice)


@pytest.fixture
def bob_cookie(bob):
    return cookie_for(bob)


@pytest.fixture
def session(alice):
    return MobilePairingSession.objects.open(alice)


def socket(session_id, cookie=None, origin=ORIGIN):
    headers = []
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    if cookie is not None:
        headers.append((b"cookie", cookie.encode()))
    return WebsocketCommunicator(application, f"/ws/pair/mobile/{session_id}/", headers=headers)


async def redeem_over_http(opened, **kwargs):
    """The phone pairs through the real API view, commit and all."""
    response = await database_sync_to_async(pair_phone)(Client(), secret=opened.secret, **kwargs)
    return response


async def test_the_owner_gets_the_snapshot_first_then_the_paired_event(session, alice_cookie):
    communicator = socket(session.row.id, alice_cookie)
    connected, _ = await communicator.connect()
    assert connected
    snapshot = await communicator.receive_json_from()
    assert snapshot["state"] == "waiting"
    assert snapshot["session_id"] == str(session.row.id)
    assert 595 <= snapshot["expires_in_seconds"] <= 600

    response = await redeem_over_http(session)
    assert response.status_code == 201

    event = await communicator.receive_json_from()
    island = await Island.objects.aget()
    assert event == {
        "state": "paired",
        "session_id": str(session.row.id),
        "island": {
            "id": str(island.pk),
            "name": island.name,
            "label": "iPhone 15 Pro (CoreML / ANE)",
            "platform": "ios",
            "model": "iPhone 15 Pro",
            "os_version": "18.1",
            "runtime": "coreml",
            "accelerator": "ane",
            "removed": False,
            "remove_url": f"/settings/islands/{island.pk}/remove",
        },
    }
    await communicator.disconnect()


async def test_connecting_after_pairing_gets_paired_first(session, alice_cookie):
    assert (await redeem_over_http(session)).status_code == 201
    communicator = socket(session.row.id, alice_cookie)
    assert (await communicator.connect())[0]
    snapshot = await communicator.receive_json_from()
    assert snapshot["state"] == "paired"
    assert snapshot["island"]["label"] == "iPhone 15 Pro (CoreML / ANE)"
    assert await communicator.receive_nothing()
    await communicator.disconnect()


async def test_anonymous_is_closed_with_4401_before_anything_is_sent(session):
    communicator = socket(session.row.id)
    connected, _ = await communicator.connect()
    assert connected  # accepted, so that the close code reaches the browser
    assert await communicator.receive_output() == {"type": "websocket.close", "code": 4401}


async def test_another_user_is_closed_with_4403_and_hears_nothing(session, bob_cookie):
    communicator = socket(session.row.id, bob_cookie)
    assert (await communicator.connect())[0]
    assert await communicator.receive_output() == {"type": "websocket.close", "code": 4403}
    # Bob is in no group: Alice's pairing does not reach him.
    assert (await redeem_over_http(session)).status_code == 201
    assert await communicator.receive_nothing()


async def test_an_event_sent_while_the_socket_is_being_checked_reaches_only_the_owner(
    session, alice_cookie, bob_cookie, monkeypatch
):
    """A socket joins the session's group before its owner is checked (one trip to the
    database for both); what is announced in that window must not reach a stranger."""
    owner = socket(session.row.id, alice_cookie)
    assert (await owner.connect())[0]
    assert (await owner.receive_json_from())["state"] == "waiting"

    checking = MobilePairingConsumer.find_session

    def announce_while_checking(consumer, session_id):
        with transaction.atomic():
            MobilePairingSession.objects.get(pk=session_id).announce()
        return checking(consumer, session_id)

    monkeypatch.setattr(MobilePairingConsumer, "find_session", announce_while_checking)
    stranger = socket(session.row.id, bob_cookie)
    assert (await stranger.connect())[0]
    assert await stranger.receive_output() == {"type": "websocket.close", "code": 4403}
    assert await stranger.receive_nothing()
    # The owner, in the group all along, hears it.
    assert (await owner.receive_json_from())["state"] == "waiting"
    await owner.disconnect()


async def test_an_unknown_session_looks_like_someone_elses(db, alice_cookie):
    communicator = socket("00000000-0000-4000-8000-000000000000", alice_cookie)
    assert (await communicator.connect())[0]
    assert await communicator.receive_output() == {"type": "websocket.close", "code": 4403}


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "null",
        None,
        # The site's host on another port, on another scheme, or by another name.
        "http://127.0.0.1:9999",
        "http://127.0.0.1",
        "https://127.0.0.1:8000",
        "http://localhost:8000",
    ],
)
async def test_a_foreign_or_missing_origin_is_rejected_at_the_handshake(session, alice_cookie, origin):
    communicator = socket(session.row.id, alice_cookie, origin=origin)
    connected, _ = await communicator.connect()
    assert not connected


@pytest.mark.parametrize(
    ("origin", "accepted"),
    [
        ("https://islands.example.org", True),
        ("https://islands.example.org:443", True),
        ("http://islands.example.org", False),
        ("https://islands.example.org:8443", False),
        ("https://staff.example.org", True),  # CSRF_TRUSTED_ORIGINS' https://*.example.org
        ("http://staff.example.org", False),
        ("http://127.0.0.1:8000", False),  # no longer PUBLIC_URL
    ],
)
async def test_the_origin_is_compared_by_scheme_host_and_port_with_public_url_and_trusted_origins(
    session, alice_cookie, settings, origin, accepted
):
    settings.PUBLIC_URL = "https://islands.example.org"
    settings.CSRF_TRUSTED_ORIGINS = ["https://*.example.org"]
    communicator = socket(session.row.id, alice_cookie, origin=origin)
    connected, _ = await communicator.connect()
    assert connected is accepted
    await communicator.disconnect()


async def test_an_expired_session_says_so(session, alice_cookie):
    await MobilePairingSession.objects.filter(pk=session.row.pk).aupdate(
        expires_at=session.row.created_at - timedelta(seconds=1)
    )
    communicator = socket(session.row.id, alice_cookie)
    assert (await communicator.connect())[0]
    assert await communicator.receive_json_from() == {
        "state": "expired",
        "session_id": str(session.row.id),
        "reason": "expired",
    }
    await communicator.disconnect()


async def test_opening_a_new_session_tells_the_old_page_it_was_replaced(session, alice, alice_cookie):
    communicator = socket(session.row.id, alice_cookie)
    assert (await communicator.connect())[0]
    assert (await communicator.receive_json_from())["state"] == "waiting"
    await database_sync_to_async(MobilePairingSession.objects.open)(alice)
    assert await communicator.receive_json_from() == {
        "state": "expired",
        "session_id": str(session.row.id),
        "reason": "replaced",
    }
    await communicator.disconnect()


async def test_a_refused_pairing_announces_nothing(session, bob, alice_cookie):
    await Island.objects.acreate(owner=bob, host_id=PHONE_HOST_ID, kind=Island.Kind.MOBILE)
    communicator = socket(session.row.id, alice_cookie)
    assert (await communicator.connect())[0]
    assert (await communicator.receive_json_from())["state"] == "waiting"
    assert (await redeem_over_http(session)).status_code == 409
    assert await communicator.receive_nothing()
    await communicator.disconnect()


async def test_the_event_is_sent_only_after_the_commit(session, alice_cookie):
    """Inside the redeeming transaction the page hears nothing; after the commit it does."""
    communicator = socket(session.row.id, alice_cookie)
    assert (await communicator.connect())[0]
    assert (await communicator.receive_json_from())["state"] == "waiting"
    heard_inside = []

    def redeem_and_listen():
        try:
            with transaction.atomic():
                MobilePairingSession.objects.redeem(
                    secret=session.secret, host_id=PHONE_HOST_ID, device=device()
                )
                heard_inside.append(not async_to_sync(communicator.receive_nothing)(timeout=0.5))
        finally:
            connection.close()  # this thread's own connection, or it outlives the test database

    # Not thread-sensitive: the consumer's own dispatch needs that thread (to
    # close stale connections), and must be free to deliver an early event.
    await sync_to_async(redeem_and_listen, thread_sensitive=False)()
    assert heard_inside == [False]
    assert (await communicator.receive_json_from())["state"] == "paired"
    await communicator.disconnect()


async def test_messages_from_the_browser_are_ignored(session, alice_cookie):
    communicator = socket(session.row.id, alice_cookie)
    assert (await communicator.connect())[0]
    await communicator.receive_json_from()
    await communicator.send_json_to({"state": "paired"})
    assert await communicator.receive_nothing()
    assert await MobilePairingSession.objects.filter(used_at__isnull=True).aexists()
    await communicator.disconnect()


@pytest.mark.parametrize(
    "frame",
    [{"text": "not json"}, {"text": ""}, {"bytes": b"\x00\xff"}],
    ids=["not-json", "empty-text", "binary"],
)
@pytest.mark.parametrize("who", ["owner", "stranger"])
async def test_frames_that_are_not_json_are_ignored_too(session, alice_cookie, bob_cookie, frame, who):
    """Found by tests/fuzz: the JSON consumer decoded every frame and crashed on these."""
    communicator = socket(session.row.id, alice_cookie if who == "owner" else bob_cookie)
    assert (await communicator.connect())[0]
    await communicator.receive_output()  # the snapshot, or the 4403 close
    await communicator.send_input({"type": "websocket.receive", **frame})
    assert await communicator.receive_nothing()
    await communicator.disconnect()  # raises if the consumer raised


@pytest.mark.parametrize(
    "path",
    ["/ws/pair/mobile/not-a-uuid/", "/ws/unknown/", "/", "/ws/pair/mobile/"],
)
async def test_a_socket_to_an_unknown_path_is_refused_cleanly(db, alice_cookie, path):
    communicator = WebsocketCommunicator(
        application, path, headers=[(b"origin", ORIGIN.encode()), (b"cookie", alice_cookie.encode())]
    )
    assert await communicator.connect() == (False, 1000)
    await communicator.disconnect()  # raises if the application raised


@pytest.mark.parametrize("origin", ["http://[::1", "http://[127.0.0.1]:8000", "http://[::1]:99999"])
async def test_a_malformed_origin_is_rejected_at_the_handshake(session, alice_cookie, origin):
    """Found by tests/fuzz: Channels' origin check let urlparse's ValueError escape."""
    communicator = socket(session.row.id, alice_cookie, origin=origin)
    assert await communicator.connect() == (False, 1000)
    await communicator.disconnect()  # raises if the application raised


async def test_a_forged_session_cookie_is_nobody(session):
    """Found by tests/fuzz: a NUL in the cookie reached PostgreSQL, which raised."""
    communicator = socket(session.row.id, cookie="sessionid=" + "\x00" * 32)
    assert (await communicator.connect())[0]
    assert await communicator.receive_output() == {"type": "websocket.close", "code": 4401}
    await communicator.disconnect()
