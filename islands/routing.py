from channels.auth import AuthMiddlewareStack
from django.urls import URLPattern, path

from islands.consumers import FleetConsumer

websocket_urlpatterns: list[URLPattern] = [
    # "Your Islands" live: see FleetConsumer. The session cookie says who is there.
    path("ws/islands/", AuthMiddlewareStack(FleetConsumer.as_asgi())),
]
