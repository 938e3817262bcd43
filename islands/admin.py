from django.contrib import admin

from islands.models import Island


@admin.register(Island)
class IslandAdmin(admin.ModelAdmin[Island]):
    list_display = ["name", "host_id", "owner", "kind", "hardware_summary", "paired_at", "removed_at"]
    list_filter = ["kind", "platform", ("removed_at", admin.EmptyFieldListFilter)]
    search_fields = ["host_id", "name", "owner__username", "owner__email"]
    list_select_related = ["owner"]
    raw_id_fields = ["owner"]
    readonly_fields = ["id", "host_id", "token_state", "paired_at", "removed_at"]
    exclude = ["token_hash"]

    @admin.display(description="API token")
    def token_state(self, obj: Island) -> str:
        if obj.token_hash is None:
            return "None (not collected yet, or revoked)"
        expiry = f", expires {obj.token_expires_at:%Y-%m-%d %H:%M} UTC" if obj.token_expires_at else ""
        return f"Issued (stored hashed{expiry})"
