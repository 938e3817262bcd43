from django.contrib import admin
from django.urls import include, path

from archipelag import openapi, views
from notify import views as notify_views

# API clients parse every answer as JSON, 404s included.
handler400 = "archipelag.views.bad_request"
handler404 = "archipelag.views.not_found"
# A database out of reach is a 503 to retry, never a 500.
handler500 = "archipelag.views.server_error"

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("api/v1/ping", views.ping, name="ping"),
    path("api/v1/openapi.json", openapi.openapi_json, name="openapi"),
    path("accounts/signup/", notify_views.signup, name="signup"),
    # Django's login, counting attempts per account and per address (archipelag.auth).
    path("accounts/login/", views.LoginView.as_view(), name="login"),
    # Django's own reset views, counted per address before they send (notify.views).
    path(
        "accounts/password_reset/", notify_views.ThrottledPasswordResetView.as_view(), name="password_reset"
    ),
    path("", include("notify.urls")),
    path("accounts/", include("django.contrib.auth.urls")),
    path("admin/", admin.site.urls),
    path("", include("pairing.urls")),
    path("", include("islands.urls")),
    path("", include("karma.urls")),
]
