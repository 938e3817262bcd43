from django.contrib import admin

from archipelag.admin import ReadOnlyAdmin, ReadOnlyInline
from notify.models import Delivery, EmailAddress, Notification, Preferences, WebhookEndpoint


@admin.register(EmailAddress)
class EmailAddressAdmin(admin.ModelAdmin[EmailAddress]):
    list_display = ["email", "user", "confirmed", "created_at", "confirmed_at"]
    list_filter = [("confirmed_at", admin.EmptyFieldListFilter)]
    search_fields = ["email", "user__username"]
    readonly_fields = ["created_at", "confirmed_at"]

    @admin.display(boolean=True)
    def confirmed(self, obj: EmailAddress) -> bool:
        return obj.confirmed


class DeliveryInline(ReadOnlyInline[Delivery, Notification]):
    model = Delivery
    fields = ["channel", "target", "status", "attempts", "sent_at", "last_error"]


@admin.register(Notification)
class NotificationAdmin(ReadOnlyAdmin, admin.ModelAdmin[Notification]):
    list_display = ["kind", "user", "island_id", "created_at", "key"]
    list_filter = ["kind"]
    search_fields = ["user__username", "key"]
    readonly_fields = ["user", "island_id", "kind", "key", "data", "created_at"]
    inlines = [DeliveryInline]


@admin.register(Delivery)
class DeliveryAdmin(ReadOnlyAdmin, admin.ModelAdmin[Delivery]):
    list_display = ["message_id", "channel", "target", "status", "attempts", "next_attempt_at", "sent_at"]
    list_filter = ["channel", "status"]
    search_fields = ["message_id", "target", "notification__user__username"]
    readonly_fields = ["message_id", "claim", "claimed_until", "last_error"]


@admin.register(Preferences)
class PreferencesAdmin(admin.ModelAdmin[Preferences]):
    list_display = ["user", "offline_grace_minutes", "offline", "online", "linked", "karma_level"]
    list_filter = ["offline", "online", "linked", "karma_level"]
    search_fields = ["user__username"]


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(admin.ModelAdmin[WebhookEndpoint]):
    list_display = ["url", "user", "created_at", "paused"]
    list_filter = [("paused_at", admin.EmptyFieldListFilter)]
    search_fields = ["url", "user__username"]
    # The secret is shown once to its owner and never here, not even encrypted.
    exclude = ["secret_encrypted"]
    readonly_fields = ["created_at", "paused_at", "paused_reason"]

    @admin.display(boolean=True)
    def paused(self, obj: WebhookEndpoint) -> bool:
        return obj.paused
