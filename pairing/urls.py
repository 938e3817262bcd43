from django.urls import path

from pairing import views

app_name = "pairing"

urlpatterns = [
    path("pair", views.pair, name="pair"),
    path("pair/confirm", views.confirm, name="confirm"),
    path("pair/keys", views.add_keys, name="add-keys"),
    path("api/v1/islands/pairing", views.api_pairing, name="api-pairing"),
    path("api/v1/islands/pairing/poll", views.api_pairing_poll, name="api-pairing-poll"),
    path("pair/mobile", views.pair_mobile, name="pair-mobile"),
    path("pair/mobile/scan", views.mobile_scan, name="mobile-scan"),
    path("pair/mobile/<uuid:session_id>/status", views.mobile_status, name="mobile-status"),
    path("api/v1/mobile/pair", views.api_mobile_pair, name="api-mobile-pair"),
]
