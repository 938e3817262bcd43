from django.contrib import admin
from django.urls import include, path

from archipelag import views

# API clients parse every answer as JSON, 404s included.
handler404 = "archipelag.views.not_found"

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("api/v1/ping", views.ping, name="ping"),
    path("accounts/signup/", views.signup, name="signup"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("admin/", admin.site.urls),
    path("", include("pairing.urls")),
    path("", include("islands.urls")),
    path("", include("karma.urls")),
]
