from django.urls import URLPattern

# The mobile pairing page's live confirmation socket lands here.
websocket_urlpatterns: list[URLPattern] = []
