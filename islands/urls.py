from django.urls import path

from islands import views

app_name = "islands"

urlpatterns = [
    path("settings", views.settings_page, name="settings"),
    path("settings/islands/<uuid:pk>/remove", views.remove, name="remove"),
    path("api/v1/islands/heartbeat", views.api_heartbeat, name="api-heartbeat"),
]
