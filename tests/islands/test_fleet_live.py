"""The /ws/islands/ socket behind the live "Your Islands", through the real ASGI stack.

A snapshot of the account's Islands first, then a message naming the
Islands that changed: a status transition (first heartbeat, silence,
sign-off, return) or an ended job, sent once the change commits. A plain
heartbeat sends nothing, and no one hears of another account's Islands.
"""

import asyncio
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client
from django.utils import timezone

from archipelag.asgi import application
from islands.models import Island, Job, MaintenanceWindow
from tests.islands.conftest import AGENT_HEARTBEAT, beat, give_job, make_island, post_json

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("fresh_channel_layer"),
]

ORIGIN = "http://127.0.0.1:8000"
# Long enough for a message the layer already holds; a test that expects
# none waits this long for nothing.
QUIET = 0.3


def cookie_for(user) -> str:
    client = Client()
    client.force_login(user)
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"


async def open_socket(user=None, origin=ORIGIN):
    headers = [(b"origin", origin.encode())]
    if user is not None:
        headers.append((b"cookie", (await database_sync_to_async(cookie_for)(user)).encode()))
    communicator = WebsocketCommunicator(application, "/ws/islands/", headers=headers)
    connected, _ = await communicator.connect()
    return communicator, connected


async def linked(owner, host_id: str, **fields):
    return await database_sync_to_async(make_island)(owner, host_id=host_id, **fields)


async def heartbeat_over_http(island: Island, status: str = "online"):
    return await database_sync_to_async(_heartbeat_over_http)(island, status)


def _heartbeat_over_http(island: Island, status: str):
    token = island.issue_token()
    body = {**AGENT_HEARTBEAT, "host_id": island.host_id, "status": status}
    response = post_json(Client(), "/api/v1/islands/heartbeat", body, token)
    assert response.status_code == 200, response.content
    return response.status_code


async def test_a_signed_out_socket_is_closed_with_4401():
    communicator, connected = await open_socket()
    assert connected
    assert await communicator.receive_output() == {"type": "websocket.close", "code": 4401}


async def test_another_sites_page_cannot_open_it(alice):
    _communicator, connected = await open_socket(alice, origin="https://evil.example")
    assert not connected


async def test_the_snapshot_holds_each_of_the_owners_islands_and_no_one_elses(alice, bob):
    waiting = await linked(alice, "alice-host-new")
    online = await linked(alice, "alice-host-on")
    await database_sync_to_async(beat)(online, timezone.now())
    await linked(bob, "bob-host-1")
    communicator, _ = await open_socket(alice)
    snapshot = await communicator.receive_json_from()
    assert snapshot["type"] == "snapshot"
    assert snapshot["islands"] == {
        str(waiting.pk): "new|0|0|0.0000|50.00|",
        str(online.pk): "online|0|0|0.0000|50.00|",
    }
    await communicator.disconnect()


async def test_first_heartbeat_sign_off_and_return_each_send_one_message_plain_heartbeats_none(alice):
    island = await linked(alice, "alice-host-1")
    communicator, _ = await open_socket(alice)
    await communicator.receive_json_from()

    assert await heartbeat_over_http(island) == 200
    assert await communicator.receive_json_from() == {"type": "changed", "islands": [str(island.pk)]}
    assert await heartbeat_over_http(island) == 200
    assert await communicator.receive_nothing(QUIET)

    assert await heartbeat_over_http(island, status="offline") == 200
    assert await communicator.receive_json_from() == {"type": "changed", "islands": [str(island.pk)]}
    assert await heartbeat_over_http(island) == 200
    assert await communicator.receive_json_from() == {"type": "changed", "islands": [str(island.pk)]}
    assert await communicator.receive_nothing(QUIET)
    await communicator.disconnect()


async def test_the_watcher_recording_a_silence_sends_one_message(alice):
    island = await linked(alice, "alice-host-1")
    at = timezone.now() - timedelta(minutes=5)
    await database_sync_to_async(beat)(island, at)
    communicator, _ = await open_socket(alice)
    snapshot = await communicator.receive_json_from()
    assert snapshot["islands"][str(island.pk)].startswith("offline|")

    changes = await database_sync_to_async(Island.objects.record_silences)(timezone.now())
    assert len(changes) == 1
    assert await communicator.receive_json_from() == {"type": "changed", "islands": [str(island.pk)]}
    assert await database_sync_to_async(Island.objects.record_silences)(timezone.now()) == []
    assert await communicator.receive_nothing(QUIET)
    await communicator.disconnect()


async def test_a_job_outcome_sends_a_message(alice):
    island = await linked(alice, "alice-host-1")
    job = await database_sync_to_async(give_job)(island=island, job_id="job-1")
    communicator, _ = await open_socket(alice)
    await communicator.receive_json_from()

    await database_sync_to_async(Job.objects.apply_status)(island, job.job_id, "succeeded", None)
    assert await communicator.receive_json_from() == {"type": "changed", "islands": [str(island.pk)]}
    await communicator.disconnect()


async def test_no_one_hears_of_another_accounts_islands(alice, bob):
    await linked(alice, "alice-host-1")
    bobs = await linked(bob, "bob-host-1")
    communicator, _ = await open_socket(alice)
    await communicator.receive_json_from()
    assert await heartbeat_over_http(bobs) == 200
    assert await communicator.receive_nothing(QUIET)
    await communicator.disconnect()


async def test_a_heartbeat_batch_sends_one_message_per_owner(alice, bob):
    alices = [await linked(alice, f"alice-host-{n}") for n in range(3)]
    bobs = await linked(bob, "bob-host-1")
    communicator, _ = await open_socket(alice)
    await communicator.receive_json_from()
    await database_sync_to_async(beat)([*alices, bobs], timezone.now())
    message = await communicator.receive_json_from()
    assert message == {"type": "changed", "islands": sorted(str(island.pk) for island in alices)}
    assert await communicator.receive_nothing(QUIET)
    await communicator.disconnect()


async def test_frames_from_the_browser_are_ignored(alice):
    communicator, _ = await open_socket(alice)
    await communicator.receive_json_from()
    await communicator.send_to(bytes_data=b"\x00\xff")
    await communicator.send_to(text_data="not json")
    await asyncio.sleep(0.05)
    assert await communicator.receive_nothing(QUIET)
    await communicator.disconnect()


async def test_starting_and_ending_maintenance_sends_a_message(alice):
    island = await linked(alice, "alice-host-1")
    communicator, _ = await open_socket(alice)
    await communicator.receive_json_from()
    now = timezone.now()
    announce = database_sync_to_async(MaintenanceWindow.objects.announce)
    await announce(island, now + timedelta(hours=1), "owner", now)
    assert await communicator.receive_json_from() == {"type": "changed", "islands": [str(island.pk)]}
    await announce(island, None, "owner", now + timedelta(minutes=1))
    assert await communicator.receive_json_from() == {"type": "changed", "islands": [str(island.pk)]}
    await communicator.disconnect()


async def test_the_snapshot_says_until_when_an_island_is_in_maintenance(alice):
    island = await linked(alice, "alice-host-1")
    now = timezone.now()
    until = await database_sync_to_async(MaintenanceWindow.objects.announce)(
        island, now + timedelta(hours=1), "owner", now
    )
    communicator, _ = await open_socket(alice)
    snapshot = await communicator.receive_json_from()
    assert snapshot["islands"][str(island.pk)] == f"new|0|0|0.0000|50.00|{until.isoformat()}"
    await communicator.disconnect()
