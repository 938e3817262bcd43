"""The websocket baseline: a bare consumer that joins a channels-redis group, nothing else.

Served by the same daphne, settings and channel layer as the real
application, so the difference to MobilePairingConsumer is what the real one
adds (authentication, the session lookups, the snapshot).
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "archipelag.settings")
django_asgi_app = get_asgi_application()

from channels.generic.websocket import AsyncJsonWebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402


class BareConsumer(AsyncJsonWebsocketConsumer):
    group_name = ""

    async def connect(self) -> None:
        await self.accept()
        self.group_name = f"bench.bare.{self.scope['url_route']['kwargs']['n']}"
        await self.channel_layer.group_add(self.group_name, self.channel_name)
        await self.send_json({"state": "joined"})

    async def disconnect(self, code: int) -> None:
        if self.group_name:
            await self.channel_layer.group_discard(self.group_name, self.channel_name)

    async def bench_ping(self, event: dict[str, object]) -> None:
        await self.send_json(event)


application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": URLRouter([path("ws/bare/<int:n>/", BareConsumer.as_asgi())]),
    }
)
