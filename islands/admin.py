from datetime import timedelta
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import ForeignKey, QuerySet
from django.forms import ModelChoiceField
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from archipelag.admin import ReadOnlyAdmin, ReadOnlyInline, has_model_permission, newest_first
from islands.models import (
    ELIGIBILITY,
    Attempt,
    DispatcherKey,
    DuplicateJob,
    Island,
    IslandIneligible,
    IslandKey,
    IslandQuerySet,
    Job,
    JobSpec,
    JobStateConflict,
    OutboxMessage,
    StatusChange,
)

# The Island page shows the newest rows of its history; the full lists are
# one click away, filtered to the Island.
LEDGER_ROWS = 50
STATUS_CHANGE_ROWS = 20


class LiveStatusFilter(admin.SimpleListFilter):
    """Filter by the status people see, computed from the clock like the cards."""

    title = "status"
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return list(Island.LiveStatus.choices)

    def queryset(self, request: HttpRequest, queryset: QuerySet[Island]) -> QuerySet[Island]:
        value = self.value()
        if value not in Island.LiveStatus.values:
            return queryset
        assert isinstance(queryset, IslandQuerySet)
        return queryset.shown_as(Island.LiveStatus(value), timezone.now())


class JobInline(ReadOnlyInline[Job, Island]):
    model = Job
    formset = newest_first(LEDGER_ROWS)
    ordering = ["-assigned_at"]
    fields = readonly_fields = (
        "job_id",
        "workload",
        "state",
        "credits",
        "assigned_at",
        "started_at",
        "finished_at",
        "error",
    )
    verbose_name_plural = f"Job ledger (newest {LEDGER_ROWS})"


class IslandAttemptInline(ReadOnlyInline[Attempt, Island]):
    """Every placement on the Island, including jobs that later moved to another one."""

    model = Attempt
    fk_name = "island"
    formset = newest_first(LEDGER_ROWS)
    ordering = ["-assigned_at", "-pk"]
    fields = readonly_fields = (
        "job",
        "number",
        "assigned_at",
        "started_at",
        "finished_at",
        "ending",
        "credits",
    )
    verbose_name_plural = f"Attempts (newest {LEDGER_ROWS})"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Attempt]:
        # Each row is named after its job.
        return super().get_queryset(request).select_related("job")

    @admin.display(description="Outcome")
    def ending(self, obj: Attempt) -> str:
        return _ending(obj)


def _ending(attempt: Attempt) -> str:
    # An attempt has no outcome until it ends; the job is then still its Island's.
    return attempt.get_outcome_display() if attempt.outcome else "Not ended yet"


class StatusChangeInline(ReadOnlyInline[StatusChange, Island]):
    model = StatusChange
    formset = newest_first(STATUS_CHANGE_ROWS)
    ordering = ["-at"]
    fields = readonly_fields = ("at", "from_status", "to_status", "reason")
    verbose_name_plural = f"Status changes (newest {STATUS_CHANGE_ROWS})"


@admin.register(Island)
class IslandAdmin(admin.ModelAdmin[Island]):
    def save_model(self, request: HttpRequest, obj: Island, form: Any, change: bool) -> None:
        # Write only what the admin changed: heartbeats and the ledgers keep
        # updating the row while the form is open.
        if change:
            obj.save(update_fields=[name for name in form.changed_data if name in form.base_fields])
        else:
            obj.save()

    list_display = [
        "name",
        "host_id",
        "owner",
        "kind",
        "live_status",
        "last_heartbeat_at",
        "karma",
        "jobs_completed",
        "jobs_failed",
        "earnings",
        "hardware_summary",
        "paired_at",
    ]
    list_filter = [
        LiveStatusFilter,
        "kind",
        ("owner", admin.RelatedOnlyFieldListFilter),
        "platform",
        ("removed_at", admin.EmptyFieldListFilter),
    ]
    search_fields = ["host_id", "name", "owner__username", "owner__email"]
    list_select_related = ["owner"]
    raw_id_fields = ["owner"]
    # Counters are derived from the ledger and status from heartbeats: an
    # edit here would make them lie.
    readonly_fields = [
        "id",
        "host_id",
        "token_state",
        "paired_at",
        "removed_at",
        "suspended_at",
        "live_status",
        "status",
        "last_heartbeat_at",
        "offline_after",
        "karma",
        "jobs_completed",
        "jobs_failed",
        "earnings",
        "ledger",
        "metrics",
        "supported_runtimes",
        "asking_prices",
        # What placement reads: from how it paired and from its heartbeats.
        "transport",
        "runtimes",
        "capacity",
        "may_work",
        "jobs_running",
    ]
    exclude = ["token_hash"]
    # karma/admin.py adds the Island's karma events and the adjustment action.
    inlines = [JobInline, IslandAttemptInline, StatusChangeInline]
    actions = ["remove_islands", "suspend_islands", "unsuspend_islands"]

    @admin.display(description="API token")
    def token_state(self, obj: Island) -> str:
        if obj.token_hash is None:
            return "None (not collected yet, or revoked)"
        expiry = f", expires {obj.token_expires_at:%Y-%m-%d %H:%M} UTC" if obj.token_expires_at else ""
        return f"Issued (stored hashed{expiry})"

    @admin.display(description="Status", ordering="offline_after")
    def live_status(self, obj: Island) -> str:
        status = obj.status_at(timezone.now())
        return format_html('<span class="island-status-{}">{}</span>', status, status.label)

    @admin.display(description="Job ledger")
    def ledger(self, obj: Island) -> str:
        jobs = reverse("admin:islands_job_changelist") + f"?island__id__exact={obj.pk}"
        attempts = reverse("admin:islands_attempt_changelist") + f"?island__id__exact={obj.pk}"
        return format_html(
            '<a href="{}">All jobs of this Island</a> · <a href="{}">All its attempts</a>', jobs, attempts
        )

    # Every action declares the permission it needs (docs/deploy.md, admin
    # roles): Django offers an action, and runs a posted one, only to staff
    # who hold it. Support staff, who may only view, see none of these.
    @admin.action(
        description="Remove selected Islands (revoke their tokens at once)", permissions=("change",)
    )
    def remove_islands(self, request: HttpRequest, queryset: QuerySet[Island]) -> None:
        now = timezone.now()
        removed = 0
        for island in queryset.filter(removed_at__isnull=True):
            island.remove(now)
            removed += 1
        self.message_user(
            request, f"Removed {removed} Island(s); their tokens no longer work.", messages.SUCCESS
        )

    @admin.action(description="Suspend selected Islands (no new jobs)", permissions=("change",))
    def suspend_islands(self, request: HttpRequest, queryset: QuerySet[Island]) -> None:
        count = queryset.filter(suspended_at__isnull=True).update(suspended_at=timezone.now())
        self.message_user(request, f"Suspended {count} Island(s).", messages.SUCCESS)

    @admin.action(description="Lift the suspension of selected Islands", permissions=("change",))
    def unsuspend_islands(self, request: HttpRequest, queryset: QuerySet[Island]) -> None:
        count = queryset.filter(suspended_at__isnull=False).update(suspended_at=None)
        self.message_user(request, f"Lifted the suspension of {count} Island(s).", messages.SUCCESS)

    def has_delete_permission(self, request: HttpRequest, obj: Island | None = None) -> bool:
        # Deleting would take the job ledger and status history with it;
        # "Remove" unlinks the Island and revokes its token instead.
        return False


class JobAddForm(forms.ModelForm[Job]):
    """Give a job to a named Island for a fixed amount, as the dispatcher's explicit form does."""

    lease_seconds = forms.IntegerField(
        min_value=1,
        max_value=7 * 24 * 3600,
        initial=300,
        help_text="How long the Island has to report a final state before the job times out.",
    )

    class Meta:
        model = Job
        fields = ["job_id", "island", "workload", "credits"]

    def spec(self) -> JobSpec:
        data = self.cleaned_data
        return JobSpec(
            job_id=data["job_id"],
            workload=data["workload"],
            lease=timedelta(seconds=data["lease_seconds"]),
            budget=data["credits"],
            credits=data["credits"],
        )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        island: Island | None = data.get("island")
        if island is not None and not self.errors:
            # The rules placement applies (ELIGIBILITY), said here as a form error.
            counts = Island.objects.filter(pk=island.pk).exclusions(self.spec(), timezone.now())
            failed = [rule for rule in ELIGIBILITY if counts[rule.name]]
            if failed:
                raise forms.ValidationError(f"This Island cannot take the job: {failed[0].refusal}.")
        return data


class JobAttemptInline(ReadOnlyInline[Attempt, Job]):
    """Each placement of the job (at most MAX_ATTEMPTS), first to last."""

    model = Attempt
    fk_name = "job"
    ordering = ["number"]
    show_change_link = False
    fields = readonly_fields = (
        "number",
        "island",
        "assigned_at",
        "started_at",
        "finished_at",
        "ending",
        "credits",
    )
    verbose_name_plural = "Attempts"

    @admin.display(description="Outcome")
    def ending(self, obj: Attempt) -> str:
        return _ending(obj)


@admin.register(Job)
class JobAdmin(admin.ModelAdmin[Job]):
    """The ledger: jobs can be recorded and cancelled here like the dispatcher does, never edited."""

    list_display = [
        "job_id",
        "island",
        "workload",
        "state",
        "attempt",
        "credits",
        "assigned_at",
        "started_at",
        "finished_at",
        "lease_expires_at",
    ]
    list_filter = ["state", "runtime", "assigned_at"]
    search_fields = ["job_id", "workload", "island__host_id", "island__name", "island__owner__username"]
    list_select_related = ["island"]
    raw_id_fields = ["island"]
    date_hierarchy = "assigned_at"
    inlines = [JobAttemptInline]
    actions = ["cancel_jobs"]

    def get_inlines(self, request: HttpRequest, obj: Job | None) -> list[type[Any]]:
        # A job being recorded has no attempts yet.
        return [] if obj is None else list(self.inlines)

    def get_form(
        self, request: HttpRequest, obj: Job | None = None, change: bool = False, **kwargs: Any
    ) -> Any:
        if obj is None:
            kwargs["form"] = JobAddForm
        return super().get_form(request, obj, change=change, **kwargs)

    def formfield_for_foreignkey(
        self, db_field: ForeignKey[Any, Any], request: HttpRequest, **kwargs: Any
    ) -> ModelChoiceField[Any] | None:
        if db_field.name == "island":
            kwargs["queryset"] = Island.objects.active()
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def add_view(
        self, request: HttpRequest, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        try:
            return super().add_view(request, form_url, extra_context)
        except (IslandIneligible, DuplicateJob) as exc:
            # The form checked the Island a moment before the placement, which
            # decides under its own lock; in between another placement may
            # have filled it, or it went offline. The view's transaction
            # rolled back: nothing was recorded.
            self.message_user(request, f"The job was not recorded: {exc}", messages.ERROR)
            return HttpResponseRedirect(request.get_full_path())

    def save_model(self, request: HttpRequest, obj: Job, form: Any, change: bool) -> None:
        # The same method the dispatcher's endpoint calls.
        assert obj.island is not None  # a required field of the add form
        job = Job.objects.submit(form.spec(), island=obj.island)
        obj.pk, obj.credits, obj.state = job.pk, job.credits, job.state
        obj.assigned_at, obj.lease_expires_at = job.assigned_at, job.lease_expires_at

    @admin.action(description="Cancel selected jobs (their Islands lose no karma)", permissions=("change",))
    def cancel_jobs(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        """What the dispatcher's cancel does, for each selected job that has not ended."""
        now = timezone.now()
        cancelled, ended = 0, 0
        for job in queryset.order_by("pk"):
            try:
                Job.objects.cancel(job.job_id, now)
            except JobStateConflict:
                # Ended before, or while, this ran.
                ended += 1
                continue
            cancelled += 1
            self.log_change(request, job, "Cancelled the job.")
        if cancelled:
            self.message_user(
                request,
                f"Cancelled {cancelled} job(s); their Islands are told to stop and lose no karma.",
                messages.SUCCESS,
            )
        if ended:
            self.message_user(request, f"Skipped {ended} job(s) that had already ended.", messages.WARNING)

    def has_change_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        # A job's fields change only through Job.objects (the dispatcher, its
        # Island, the watcher), so no job's change form can be saved. Asked
        # about jobs in general (obj None), as Django asks before offering an
        # action declared with permissions=("change",), the answer is the
        # user's change permission: staff who may change jobs may cancel them.
        if obj is not None:
            return False
        return super().has_change_permission(request)

    def has_delete_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        return False


@admin.register(Attempt)
class AttemptAdmin(ReadOnlyAdmin, admin.ModelAdmin[Attempt]):
    """Each placement of a job on an Island, written by placement, reports and the watcher."""

    list_display = [
        "job",
        "number",
        "island",
        "assigned_at",
        "started_at",
        "finished_at",
        "ending",
        "credits",
    ]
    list_filter = ["outcome", "assigned_at"]
    search_fields = ["job__job_id", "island__host_id", "island__name", "island__owner__username"]
    list_select_related = ["job", "island"]
    date_hierarchy = "assigned_at"
    fields = readonly_fields = (
        "job",
        "number",
        "island",
        "assigned_at",
        "started_at",
        "finished_at",
        "ending",
        "credits",
    )

    @admin.display(description="Outcome", ordering="outcome")
    def ending(self, obj: Attempt) -> str:
        return _ending(obj)


@admin.register(OutboxMessage)
class OutboxMessageAdmin(ReadOnlyAdmin, admin.ModelAdmin[OutboxMessage]):
    """What the bridges' senders publish to NATS agents, and what became of it (docs/dispatch.md#delivery).

    Read-only: the placement writes these rows and the senders settle them;
    a row stuck unsent, retried or given up is the first place to look when
    an agent did not get its job.
    """

    list_display = [
        "msg_id",
        "kind",
        "subject",
        "created_at",
        "sent_at",
        "withdrawn_at",
        "tries",
        "last_error",
    ]
    list_filter = [
        "kind",
        ("sent_at", admin.EmptyFieldListFilter),
        ("withdrawn_at", admin.EmptyFieldListFilter),
        "created_at",
    ]
    search_fields = ["msg_id", "subject", "job__job_id"]
    list_select_related = ["job"]
    date_hierarchy = "created_at"
    fields = readonly_fields = (
        "kind",
        "job",
        "subject",
        "msg_id",
        "payload",
        "target",
        "created_at",
        "available_at",
        "claimed_until",
        "sent_at",
        "withdrawn_at",
        "tries",
        "last_error",
        "stream_seq",
    )


@admin.register(StatusChange)
class StatusChangeAdmin(ReadOnlyAdmin, admin.ModelAdmin[StatusChange]):
    """Recorded by heartbeats and the watcher; read-only here."""

    list_display = ["island", "at", "from_status", "to_status", "reason"]
    list_filter = ["reason", "to_status", "at"]
    search_fields = ["island__host_id", "island__name", "island__owner__username"]
    list_select_related = ["island"]
    date_hierarchy = "at"
    fields = readonly_fields = ("island", "at", "from_status", "to_status", "reason")


@admin.register(DispatcherKey)
class DispatcherKeyAdmin(ReadOnlyAdmin, admin.ModelAdmin[DispatcherKey]):
    """Keys are made by `manage.py create_dispatcher_key`, which shows each once.

    Neither the key nor its hash is ever shown here.
    """

    list_display = ["name", "created_at", "revoked_at"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["name"]
    fields = readonly_fields = ("name", "created_at", "revoked_at")
    actions = ["revoke_keys"]

    # Revoking stops the dispatcher's submissions: for staff given the key's
    # change permission (superusers; no role has it).
    @admin.action(description="Revoke selected keys", permissions=("revoke",))
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[DispatcherKey]) -> None:
        count = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(request, f"Revoked {count} key(s).", messages.SUCCESS)

    def has_revoke_permission(self, request: HttpRequest) -> bool:
        return has_model_permission(request, DispatcherKey, "change")


@admin.register(IslandKey)
class IslandKeyAdmin(ReadOnlyAdmin, admin.ModelAdmin[IslandKey]):
    """Keys are made at /pair or by `manage.py create_island_key`; the secret is never kept."""

    list_display = [
        "username",
        "owner",
        "host_id",
        "island",
        "created_at",
        "first_used_at",
        "last_used_at",
        "revoked_at",
    ]
    list_filter = [("first_used_at", admin.EmptyFieldListFilter), ("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["username", "host_id", "owner__username"]
    list_select_related = ["owner", "island"]
    fields = readonly_fields = (
        "username",
        "owner",
        "host_id",
        "island",
        "created_at",
        "expires_at",
        "first_used_at",
        "last_used_at",
        "revoked_at",
    )
    actions = ["revoke_keys"]

    @admin.action(description="Revoke selected keys", permissions=("revoke",))
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[IslandKey]) -> None:
        count = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(request, f"Revoked {count} key(s).", messages.SUCCESS)

    def has_revoke_permission(self, request: HttpRequest) -> bool:
        return has_model_permission(request, IslandKey, "change")
