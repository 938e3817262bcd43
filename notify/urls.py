from django.urls import path

from notify import views

app_name = "notify"

urlpatterns = [
    path("accounts/email/", views.add_email, name="add_email"),
    path("accounts/email/resend", views.resend, name="resend"),
    path("accounts/email/confirm/<str:token>/", views.confirm, name="confirm"),
    path("settings/notifications", views.notification_settings, name="settings"),
    path("settings/notifications/webhooks", views.add_webhook, name="add_webhook"),
    path(
        "settings/notifications/webhooks/<int:pk>/<str:action>",
        views.webhook_action,
        name="webhook_action",
    ),
    path("notifications/unsubscribe/<str:token>/", views.unsubscribe, name="unsubscribe"),
    path("islands/not-me/<str:token>/", views.not_me, name="not_me"),
]
