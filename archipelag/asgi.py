"""ASGI entry point: HTTP through Django, websockets through Channels."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "archipelag.settings")
# Initialise Django (and the app registry) before importing anything that
# touches models, such as consumers and their routing.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator, WebsocketDenier  # noqa: E402
from django.urls import re_path  # noqa: E402

from pairing.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # Browser sockets: the session cookie says who is there, and the
        # Origin header must be one of ALLOWED_HOSTS, so another site cannot
        # open a socket with the user's cookie.
        # A path no route matches is refused at the handshake (a 403, as for a
        # bad origin). Without the catch-all, URLRouter raises ValueError out
        # of the application and the server logs a crash for every stray probe.
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter([*websocket_urlpatterns, re_path(r"", WebsocketDenier.as_asgi())]))
        ),
    }
)
