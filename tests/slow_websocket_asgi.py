"""An ASGI app whose websockets are accepted only after ACCEPT_AFTER seconds: a server too busy to answer.

Served by tests/test_websocket_handshake_timeout.py through archipelag.server.
"""

import asyncio
from typing import Any

ACCEPT_AFTER = 4.0


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "websocket":
        return
    message = await receive()
    assert message["type"] == "websocket.connect"
    await asyncio.sleep(ACCEPT_AFTER)
    await send({"type": "websocket.accept"})
    while (await receive())["type"] != "websocket.disconnect":
        pass
