from django.urls import URLPattern, path

from islands.consumers import FleetConsumer

websocket_urlpatterns: list[URLPattern] = [
    # "Your Islands" live: see FleetConsumer.
    path("ws/islands/", FleetConsumer.as_asgi()),
]
