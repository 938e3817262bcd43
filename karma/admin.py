from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.auth.models import User
from django.db.models import QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse

from archipelag.admin import ReadOnlyAdmin, ReadOnlyInline, has_model_permission, newest_first
from islands.admin import IslandAdmin
from islands.models import Island
from karma.forms import KarmaAdjustmentForm
from karma.models import KarmaEvent, UptimeSweep

# The Island page in the admin shows the newest events; the full list is one
# filter away in Karma events.
INLINE_EVENTS = 20


# For staff who may add karma events (operators): the ledger's admin adds
# none itself, but an adjustment is exactly one admin event per Island.
@admin.action(description="Adjust karma of selected Islands…", permissions=("adjust_karma",))
def adjust_karma(
    modeladmin: admin.ModelAdmin[Island], request: HttpRequest, queryset: QuerySet[Island]
) -> TemplateResponse | None:
    """Ask for a change and a reason, then record one admin KarmaEvent per Island."""
    # The admin lets in only signed-in staff.
    assert isinstance(request.user, User)
    form = KarmaAdjustmentForm(request.POST if "apply" in request.POST else None)
    if form.is_valid():
        delta, reason = form.cleaned_data["delta"], form.cleaned_data["reason"]
        for island in queryset:
            KarmaEvent.objects.adjust(island, delta, reason, by=request.user)
        modeladmin.message_user(
            request, f"Adjusted the karma of {len(queryset)} Island(s) by {delta:+}.", messages.SUCCESS
        )
        return None
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": "Adjust karma",
        "opts": modeladmin.model._meta,
        "islands": queryset,
        "form": form,
        "action_checkbox_name": ACTION_CHECKBOX_NAME,
    }
    return TemplateResponse(request, "admin/karma/adjust_karma.html", context)


class KarmaEventInline(ReadOnlyInline[KarmaEvent, Island]):
    """For IslandAdmin: the Island's newest karma events, read-only."""

    model = KarmaEvent
    fk_name = "island"
    formset = newest_first(INLINE_EVENTS)
    ordering = ["-id"]
    fields = readonly_fields = ("effective_at", "cause", "delta", "score_after", "reason", "created_at")
    verbose_name_plural = f"Karma events (newest {INLINE_EVENTS})"


# Islands stand below karma and know nothing of it: karma adds to their admin.
class IslandWithKarmaAdmin(IslandAdmin):
    """The Island admin, with the Island's karma events and the manual adjustment."""

    inlines = [*IslandAdmin.inlines, KarmaEventInline]
    # Karma changes only through events: adjust_karma records one per Island.
    actions = [*IslandAdmin.actions, adjust_karma]

    def has_adjust_karma_permission(self, request: HttpRequest) -> bool:
        return has_model_permission(request, KarmaEvent, "add")


admin.site.unregister(Island)
admin.site.register(Island, IslandWithKarmaAdmin)


@admin.register(KarmaEvent)
class KarmaEventAdmin(ReadOnlyAdmin, admin.ModelAdmin[KarmaEvent]):
    """The karma ledger: read-only. Adjustments are made from the Islands list."""

    list_display = [
        "effective_at",
        "island",
        "cause",
        "signed_delta",
        "requested_delta",
        "score_after",
        "reason",
        "created_at",
    ]
    list_filter = [
        "cause",
        ("island", admin.RelatedOnlyFieldListFilter),
        "effective_at",
        "created_at",
    ]
    search_fields = ["reason", "island__name", "island__host_id", "island__owner__username", "job__job_id"]
    list_select_related = ["island"]
    date_hierarchy = "effective_at"
    fields = readonly_fields = (
        "island",
        "cause",
        "reason",
        "requested_delta",
        "delta",
        "score_after",
        "effective_at",
        "created_at",
        "job",
        "status_change",
        "step",
        "day",
        "actor",
    )

    @admin.display(description="Change", ordering="delta")
    def signed_delta(self, obj: KarmaEvent) -> str:
        return f"{obj.delta:+}"


@admin.register(UptimeSweep)
class UptimeSweepAdmin(ReadOnlyAdmin, admin.ModelAdmin[UptimeSweep]):
    """The days the uptime rule has judged; written by the watcher."""

    list_display = ["day", "judged_at", "rewarded"]
    list_filter = ["day"]
    search_fields = ["day"]
    date_hierarchy = "day"
    fields = readonly_fields = ("day", "judged_at", "rewarded")
