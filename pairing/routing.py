from channels.sessions import SessionMiddlewareStack
from django.urls import URLPattern, path

from pairing.consumers import MobilePairingConsumer

websocket_urlpatterns: list[URLPattern] = [
    # The /pair/mobile page's live confirmation; see MobilePairingConsumer.
    # Only the session: the consumer reads the user with its own query, in
    # one database call (archipelag.sockets.session_user).
    path("ws/pair/mobile/<uuid:session_id>/", SessionMiddlewareStack(MobilePairingConsumer.as_asgi())),
]
