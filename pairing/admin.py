from django.contrib import admin
from django.http import HttpRequest
from django.utils import timezone

from pairing.models import MobilePairingSession, PairingCode


@admin.register(PairingCode)
class PairingCodeAdmin(admin.ModelAdmin[PairingCode]):
    """Codes are read-only here: they are made by Islands and redeemed by users.

    Only a prefix of the keyed hash is shown, enough to tell rows apart; the
    code itself was never stored.
    """

    list_display = ["host_id", "state", "channel", "created_at", "expires_at", "used_by", "requested_ip"]
    list_filter = ["channel", "created_at", "used_at"]
    search_fields = ["host_id", "used_by__username", "requested_ip"]
    date_hierarchy = "created_at"
    list_select_related = ["used_by"]
    fields = readonly_fields = (
        "host_id",
        "state",
        "code_hash_prefix",
        "channel",
        "capabilities",
        "agent_version",
        "requested_ip",
        "created_at",
        "expires_at",
        "used_at",
        "used_by",
        "island",
        "retired_at",
        "last_polled_at",
        "token_issued_at",
    )

    @admin.display(description="State")
    def state(self, obj: PairingCode) -> str:
        return obj.state(timezone.now())

    @admin.display(description="Code hash")
    def code_hash_prefix(self, obj: PairingCode) -> str:
        return f"{obj.code_hash[:8]}…"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: PairingCode | None = None) -> bool:
        return False


@admin.register(MobilePairingSession)
class MobilePairingSessionAdmin(admin.ModelAdmin[MobilePairingSession]):
    """Sessions are read-only here: pages open them and phones redeem them.

    Neither the code nor the scan secret was stored; hash prefixes tell rows apart.
    """

    list_display = [
        "id",
        "owner",
        "state",
        "created_at",
        "expires_at",
        "redeemed_via",
        "island",
        "redeemed_ip",
    ]
    list_filter = ["redeemed_via", "created_at", "used_at"]
    search_fields = ["owner__username", "island__host_id", "redeemed_ip"]
    date_hierarchy = "created_at"
    list_select_related = ["owner", "island"]
    fields = readonly_fields = (
        "id",
        "owner",
        "state",
        "code_hash_prefix",
        "scan_secret_hash_prefix",
        "created_at",
        "expires_at",
        "used_at",
        "retired_at",
        "redeemed_via",
        "redeemed_ip",
        "island",
    )

    @admin.display(description="State")
    def state(self, obj: MobilePairingSession) -> str:
        return obj.state(timezone.now())

    @admin.display(description="Code hash")
    def code_hash_prefix(self, obj: MobilePairingSession) -> str:
        return f"{obj.code_hash[:8]}…"

    @admin.display(description="Scan secret hash")
    def scan_secret_hash_prefix(self, obj: MobilePairingSession) -> str:
        return f"{obj.scan_secret_hash[:8]}…"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: MobilePairingSession | None = None) -> bool:
        return False
