"""The websocket baselines: a bare consumer, and the floor of any socket signed in by Django's session.

Served by the same daphne, settings and channel layer as the real
application, so the difference to MobilePairingConsumer is what the real one
adds.

- /ws/bare/<n>/: joins a channels-redis group and says so, nothing else.
- /ws/signed-in/<n>/: the same, behind what every browser socket of the site
  must pass before it may be told anything: the real application's Origin
  checks (RefuseMalformedOrigin, SiteOriginValidator), Channels' session
  middleware, and one database call reading the user the session cookie
  signs in (archipelag.sockets.session_user: Django's own get_user, auth
  hash included). The pairing consumer does all of that plus its own query
  and snapshot, so this is the best rate it could reach while it still
  checks sessions the way Django does (docs/performance.md, "What a signed-in
  handshake costs at least").
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "archipelag.settings")
django_asgi_app = get_asgi_application()

from channels.db import database_sync_to_async  # noqa: E402
from channels.generic.websocket import AsyncJsonWebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.sessions import SessionMiddlewareStack  # noqa: E402
from django.urls import path  # noqa: E402

from archipelag.asgi import RefuseMalformedOrigin  # noqa: E402
from archipelag.origins import SiteOriginValidator  # noqa: E402
from archipelag.sockets import session_user  # noqa: E402
from pairing.consumers import CLOSE_UNAUTHENTICATED  # noqa: E402


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


class SignedInConsumer(BareConsumer):
    """The bare consumer, once the session says who is there; a socket signed in as nobody is closed."""

    async def connect(self) -> None:
        await self.accept()
        user = await database_sync_to_async(session_user)(self.scope)
        if not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.group_name = f"bench.signed-in.{self.scope['url_route']['kwargs']['n']}"
        await self.channel_layer.group_add(self.group_name, self.channel_name)
        await self.send_json({"state": "joined", "user": user.pk})


application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": URLRouter(
            [
                path("ws/bare/<int:n>/", BareConsumer.as_asgi()),
                path(
                    "ws/signed-in/<int:n>/",
                    RefuseMalformedOrigin(
                        SiteOriginValidator(SessionMiddlewareStack(SignedInConsumer.as_asgi()))
                    ),
                ),
            ]
        ),
    }
)
