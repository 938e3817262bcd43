"""ASGI entry point: HTTP through Django, websockets through Channels.

HTTP under /api/ goes to the JSON API's own handler, with its short
middleware (archipelag/handlers.py); pages go through the browser stack.
"""

import os
from typing import Any
from urllib.parse import urlparse

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "archipelag.settings")
# Initialise Django (and the app registry) before importing anything that
# touches models, such as consumers and their routing.
django_asgi_app = get_asgi_application()

from archipelag.handlers import ApiASGIHandler, is_api_path  # noqa: E402

api_asgi_app = ApiASGIHandler()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import WebsocketDenier  # noqa: E402
from django.urls import re_path  # noqa: E402

from archipelag.origins import SiteOriginValidator  # noqa: E402
from islands.routing import websocket_urlpatterns as islands_sockets  # noqa: E402
from pairing.routing import websocket_urlpatterns as pairing_sockets  # noqa: E402


def _origin_parses(value: bytes) -> bool:
    try:
        urlparse(value.decode("latin1")).port  # noqa: B018 (reading .port validates it)
    except ValueError:
        return False
    return True


class RefuseMalformedOrigin:
    """Refuse, at the handshake, a socket whose Origin header is not a URL at all.

    Channels' origin check parses the header with urlparse and lets its
    ValueError ("Invalid IPv6 URL", a port out of range) escape, which
    crashes the application instead of refusing the socket.
    """

    def __init__(self, application: Any):
        self.application = application

    async def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
        if not all(_origin_parses(value) for name, value in scope.get("headers", []) if name == b"origin"):
            return await WebsocketDenier()(scope, receive, send)
        return await self.application(scope, receive, send)


class RouteApi:
    """Send HTTP under /api/ to `api`, everything else to `pages`."""

    def __init__(self, api: Any, pages: Any):
        self.api = api
        self.pages = pages

    async def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
        path: str = scope["path"]
        root_path: str = scope.get("root_path", "")
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        app = self.api if is_api_path(path) else self.pages
        return await app(scope, receive, send)


application = ProtocolTypeRouter(
    {
        "http": RouteApi(api_asgi_app, django_asgi_app),
        # Browser sockets: the session cookie says who is there (each
        # route reads it as it needs, see the apps' routing.py), and the
        # Origin header must be the site's own (scheme, host and port of
        # PUBLIC_URL or CSRF_TRUSTED_ORIGINS), so another site cannot
        # open a socket with the user's cookie. An Origin that is no URL, and a
        # path no route matches, are refused at the handshake (a 403) too:
        # Channels would raise ValueError out of the application for both,
        # and the server would log a crash for every stray probe.
        "websocket": RefuseMalformedOrigin(
            SiteOriginValidator(
                URLRouter([*pairing_sockets, *islands_sockets, re_path(r"", WebsocketDenier.as_asgi())])
            )
        ),
    }
)
