"""Redis restarts under daphne: no websocket handshake fails for the connections it dropped.

daphne runs with REDIS_URL on a redis-server of the test's own. Sockets
opened before the restart leave connections in the channel layer's pool;
Redis closes them all when it stops. Sockets opened after it is back must
not be the ones to find that out.
"""

import asyncio
import json
from typing import Any

import aiohttp
from django.conf import settings
from django.test import Client

from pairing.models import MobilePairingSession

SOCKETS = 60


def _cookie(user: Any) -> str:
    client = Client()
    client.force_login(user)
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"


async def _handshakes(
    url: str, cookie: str, session_id: str, count: int, hold: asyncio.Event | None = None
) -> list[str]:
    """Open `count` sockets at once; for each, the state of its first snapshot, or why there was none.

    With `hold`, each socket stays open until it is set.
    """
    ws_url = url.replace("http://", "ws://") + f"/ws/pair/mobile/{session_id}/"
    headers = {"Cookie": cookie, "Origin": url}

    async def one(http: aiohttp.ClientSession) -> str:
        try:
            timeout = aiohttp.ClientWSTimeout(ws_close=5)
            async with http.ws_connect(ws_url, headers=headers, timeout=timeout) as ws:
                message = await ws.receive(timeout=15)
                if message.type != aiohttp.WSMsgType.TEXT:
                    return f"closed {ws.close_code}"
                if hold is not None:
                    await hold.wait()
                return str(json.loads(message.data)["state"])
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"failed {type(exc).__name__}"

    async with aiohttp.ClientSession() as http:
        return await asyncio.gather(*(one(http) for _ in range(count)))


def test_no_handshake_fails_after_a_redis_restart(spawn, redis_server, alice):
    server = spawn.daphne(REDIS_URL=redis_server.url)
    session_id = str(MobilePairingSession.objects.open(alice).row.pk)
    cookie = _cookie(alice)

    async def scenario() -> tuple[list[str], list[str]]:
        # Pages stay open across the restart, as they would: their sockets
        # and the pool's connections are what Redis drops.
        restarted = asyncio.Event()
        open_pages = asyncio.create_task(_handshakes(server.url, cookie, session_id, SOCKETS, hold=restarted))
        await asyncio.sleep(3)
        await asyncio.to_thread(redis_server.stop)
        await asyncio.to_thread(redis_server.start)
        restarted.set()
        before = await open_pages
        # (The open pages' sockets were closed when Redis stopped, each with
        # a logged ConnectionError; pages then poll and reconnect, faults.md.)
        after = await _handshakes(server.url, cookie, session_id, SOCKETS)
        return before, after

    before, after = asyncio.run(scenario())
    assert before == ["waiting"] * SOCKETS
    # Every connection the pool held was dropped by the restart; each is
    # found dead as it is taken from the pool (redis-py checks a pooled
    # connection for a pending EOF before handing it out) and replaced.
    assert after == ["waiting"] * SOCKETS, {state: after.count(state) for state in set(after)}
