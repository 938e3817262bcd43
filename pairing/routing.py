from django.urls import URLPattern, path

from pairing.consumers import MobilePairingConsumer

websocket_urlpatterns: list[URLPattern] = [
    # The /pair/mobile page's live confirmation; see MobilePairingConsumer.
    path("ws/pair/mobile/<uuid:session_id>/", MobilePairingConsumer.as_asgi()),
]
