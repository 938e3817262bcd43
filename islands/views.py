import logging
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from archipelag.api import (
    TRANSIENT_DATABASE_ERRORS,
    ApiError,
    bearer_token,
    database_unavailable,
    json_api,
    parse_body,
)
from archipelag.http import AuthenticatedHtmxRequest, AuthenticatedHttpRequest
from islands.agent import (
    HEARTBEAT_MAX_BODY_BYTES,
    JOB_ID_PATTERN,
    JOB_INPUT_MAX_BYTES,
    JOB_SUBMISSION_MAX_BYTES,
    RUNTIME_NEEDS,
    Credits,
    EnhancedHeartbeat,
    JobStatus,
    JobSubmission,
    MaintenanceAnnouncement,
)
from islands.fleet import FILTERABLE, SORTS, FleetView
from islands.forms import MaintenanceForm, RenameIslandForm
from islands.groupcommit import GroupCommit, GroupCommitFailed
from islands.history import island_history
from islands.models import (
    CREDITS_PLACES,
    MAX_JOB_CREDITS,
    Attempt,
    Beat,
    DispatcherKey,
    DuplicateJob,
    HeartbeatOutcome,
    Island,
    IslandIneligible,
    IslandKey,
    Job,
    JobMoved,
    JobNotFound,
    JobSpec,
    JobStateConflict,
    MaintenanceRefused,
    MaintenanceWindow,
    NoEligibleIsland,
    hash_token,
)

logger = logging.getLogger("archipelag.islands")

BEARER_CHALLENGE = {"WWW-Authenticate": "Bearer"}
UNAUTHORIZED = "unknown, revoked or expired token: send Authorization: Bearer <token>"
# An Island polling for work gets at most this many jobs at once.
POLL_LIMIT = 32
# An HTTP Island hears in its polls of jobs the dispatcher cancelled this
# recently, so it stops running them.
CANCELLED_SHOWN_FOR = timedelta(hours=1)
# When no Island can take a job: try again once heartbeats may have changed things.
NO_ISLAND_RETRY_AFTER = 15
# The Island page lists this many of its newest karma events.
KARMA_EVENTS_SHOWN = 50
# The Island page's newest attempts: every placement of a job on it, however it ended.
ATTEMPTS_SHOWN = 50
_JOB_ID = re.compile(JOB_ID_PATTERN)
# Credits as text: ASCII digits with at most one point (and a sign, which
# the range check then refuses with a clearer message).
_CREDITS_TEXT = re.compile(r"-?[0-9]{1,20}(\.[0-9]{1,20})?")


def _island_for(request: AuthenticatedHttpRequest, pk: str) -> Island:
    """One of the signed-in user's active Islands, or 404 (never another user's)."""
    return get_object_or_404(Island.objects.owned_by(request.user), pk=pk)


def _calling_island(request: HttpRequest) -> Island:
    """The Island whose API token the request carries, or a 401.

    One indexed query on the token's hash: the token is the Island's only
    credential, so an Island can only ever act on itself.
    """
    token = bearer_token(request)
    island = Island.objects.authenticate(token) if token else None
    if island is None:
        raise ApiError(401, UNAUTHORIZED, BEARER_CHALLENGE)
    return island


# --- The Island's side: JSON API -------------------------------------------


# Heartbeats arriving together are written in one transaction; each request
# still answers only once its own beat is committed (see islands/groupcommit.py).
heartbeat_commits: GroupCommit[Beat, HeartbeatOutcome] = GroupCommit(
    lambda beats: Island.objects.record_heartbeats(beats)
)


@json_api
async def api_heartbeat(request: HttpRequest) -> HttpResponse:
    """Record an Island's heartbeat: 200 once it is committed.

    The token is checked by the same locking read that writes the beat, in a
    batch with the heartbeats arriving at the same moment, so a heartbeat
    costs no query of its own. A body that cannot be read goes through the
    same batch unwritten, so an unknown token is told so first, as on every
    endpoint.

    Async: the body is checked in the event loop (no I/O: daphne has read
    it), and a beat that joins a batch another request leads waits there
    too, on no thread; only a batch's leader hops to its request's thread
    to write (docs/performance.md).
    """
    received_at = timezone.now()
    token_hash = hash_token(bearer_token(request) or "")
    if token_hash is None:
        raise ApiError(401, UNAUTHORIZED, BEARER_CHALLENGE)
    refused: ApiError | None = None
    heartbeat: EnhancedHeartbeat | None = None
    try:
        heartbeat = parse_body(request, EnhancedHeartbeat, HEARTBEAT_MAX_BODY_BYTES)
    except ApiError as exc:
        refused = exc
    try:
        outcome = await heartbeat_commits.asubmit(Beat(heartbeat, received_at, token_hash=token_hash))
    except GroupCommitFailed as exc:
        # Another request led the batch holding this beat, and its write
        # failed; that request logs the error. Ours gets the same answer.
        if isinstance(exc.__cause__, TRANSIENT_DATABASE_ERRORS):
            raise database_unavailable() from None
        raise
    if outcome is HeartbeatOutcome.UNAUTHORIZED:
        raise ApiError(401, UNAUTHORIZED, BEARER_CHALLENGE)
    if refused is not None:
        raise refused
    if outcome is HeartbeatOutcome.WRONG_HOST:
        raise ApiError(403, "host_id is not the host of the Island this token belongs to")
    return JsonResponse({"success": True})


@json_api
def api_maintenance(request: HttpRequest) -> HttpResponse:
    """The Island announces maintenance: `{"until": "<ISO 8601 UTC>"}`, or `{"until": null}` to end it."""
    island = _calling_island(request)
    body = parse_body(request, MaintenanceAnnouncement)
    if body.until is not None and body.until.tzinfo is None:
        raise ApiError(400, "invalid until: give a UTC time, such as 2026-03-01T14:00:00Z")
    now = timezone.now()
    try:
        until = MaintenanceWindow.objects.announce(island, body.until, MaintenanceWindow.By.ISLAND, now)
    except MaintenanceRefused as exc:
        raise ApiError(400, str(exc)) from None
    logger.info(
        "event=maintenance island_id=%s until=%s by=island", island.pk, until.isoformat() if until else None
    )
    return JsonResponse({"success": True, "maintenance_until": _utc(until)})


def _utc(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z") if moment else None


@login_required
@require_POST
def maintenance(request: AuthenticatedHttpRequest, pk: str) -> HttpResponse:
    """The card's "Maintenance… until": start, extend or (end=1) end a window, in UTC."""
    island = _island_for(request, pk)
    now = timezone.now()
    if request.POST.get("end"):
        MaintenanceWindow.objects.announce(island, None, MaintenanceWindow.By.OWNER, now)
        messages.success(request, f"Maintenance of “{island.name}” ended.")
        return redirect("islands:settings")
    form = MaintenanceForm(request.POST)
    if form.is_valid():
        try:
            MaintenanceWindow.objects.announce(island, form.until_at(now), MaintenanceWindow.By.OWNER, now)
        except MaintenanceRefused as exc:
            messages.error(request, f"Maintenance of “{island.name}”: {exc}")
        else:
            messages.success(
                request, f"“{island.name}” is in maintenance until {island.maintenance_until:%H:%M} UTC."
            )
    else:
        for errors in form.errors.values():
            for error in errors:
                messages.error(request, f"Maintenance of “{island.name}”: {error}")
    return redirect("islands:settings")


@json_api
def api_jobs_poll(request: HttpRequest) -> HttpResponse:
    """The jobs given to the calling Island that it has not started, oldest first.

    Separate from the heartbeat so the heartbeat stays one lean write; each
    job is the agent's AssignJob (and its pay, `credits`). `cancelled` lists
    the jobs the dispatcher withdrew from it lately, to stop running.
    """
    island = _calling_island(request)
    jobs = Job.objects.waiting_for(island)[:POLL_LIMIT]
    withdrawn = Attempt.objects.filter(
        island=island,
        outcome=Attempt.Outcome.WITHDRAWN,
        finished_at__gte=timezone.now() - CANCELLED_SHOWN_FOR,
    ).values_list("job__job_id", flat=True)
    return JsonResponse(
        {
            "success": True,
            "jobs": [{**job.assign_job(), "credits": str(job.credits)} for job in jobs],
            "cancelled": list(withdrawn[:POLL_LIMIT]),
        }
    )


@json_api
def api_job_status(request: HttpRequest, job_id: str) -> HttpResponse:
    island = _calling_island(request)
    if not _JOB_ID.match(job_id):
        # No job can have this id; and a NUL in it would fail the query on
        # PostgreSQL. Not echoed back: it may be any text at all.
        raise ApiError(404, "no such job for this Island")
    report = parse_body(request, JobStatus)
    if report.job_id is not None and report.job_id != job_id:
        raise ApiError(400, "invalid job_id: the body names another job than the URL")
    try:
        outcome = Job.objects.apply_status(island, job_id, report.state, report.error)
    except JobNotFound as exc:
        raise ApiError(404, str(exc)) from None
    except (JobStateConflict, JobMoved) as exc:
        raise ApiError(409, str(exc)) from None
    if outcome.applied:
        logger.info("event=job_status job_id=%s island_id=%s state=%s", job_id, island.pk, outcome.state)
    return JsonResponse({"success": True, "applied": outcome.applied, "state": outcome.state})


# --- The dispatcher's side ---------------------------------------------------------


def _dispatcher(request: HttpRequest) -> DispatcherKey:
    key = DispatcherKey.objects.authenticate(bearer_token(request) or "")
    if key is None:
        raise ApiError(401, "unknown or revoked dispatcher key", BEARER_CHALLENGE)
    return key


def _credits(sent: Credits, name: str) -> Decimal:
    if isinstance(sent, str):
        if not _CREDITS_TEXT.fullmatch(sent):
            raise ApiError(400, f'invalid {name}: a decimal string such as "2.5", or a number')
        value = Decimal(sent)
    elif isinstance(sent, int):
        value = Decimal(sent)
    else:
        # A JSON number with a fraction is decoded as a float; its shortest
        # repr is the literal that was sent for any amount in range (at most
        # 12 significant digits), so nothing is lost on the way.
        value = Decimal(repr(sent))
    if not value.is_finite() or value < 0 or value > MAX_JOB_CREDITS:
        raise ApiError(400, f"invalid {name}: a number from 0 to {MAX_JOB_CREDITS}")
    if value != value.quantize(CREDITS_PLACES):
        raise ApiError(400, f"invalid {name}: at most 4 decimal places")
    return value


# A NUL in encoded JSON: \u0000 after an even number of backslashes (an odd
# number would make it the text "\u0000").
_ESCAPED_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def _spec(body: JobSubmission) -> JobSpec:
    """The job a submission describes, or a 400 saying what is wrong with it."""
    if body.island_id is None:
        if body.budget is None:
            raise ApiError(400, "invalid body: `budget` is required (the most the job may pay)")
        if body.credits is not None:
            raise ApiError(
                400, "invalid body: `credits` names an amount only with `island_id`; send `budget`"
            )
    elif body.budget is None and body.credits is None:
        raise ApiError(400, "invalid body: send `budget` (or `credits`, the amount to pay)")
    needs = RUNTIME_NEEDS.get(body.runtime)
    if needs is not None and getattr(body, needs) is None:
        # The agent would fail it on the Island, at the Island's expense.
        raise ApiError(400, f"invalid body: a {body.runtime} job needs `{needs}`")
    encoded_input = msgspec.json.encode(body.input)
    if len(encoded_input) > JOB_INPUT_MAX_BYTES:
        raise ApiError(413, f"invalid input: at most {JOB_INPUT_MAX_BYTES} bytes of JSON")
    if _ESCAPED_NUL.search(encoded_input):
        # PostgreSQL's jsonb cannot hold one; the same answer on every database.
        raise ApiError(400, "invalid input: text in it may not contain NUL (\\u0000)")
    requirements = body.requirements
    if requirements is not None and requirements.region is not None and requirements.region.lower() == "auto":
        raise ApiError(400, 'invalid requirements.region: name a region, not "auto"')
    credits = _credits(body.credits, "credits") if body.credits is not None else None
    budget = _credits(body.budget, "budget") if body.budget is not None else credits
    assert budget is not None
    if credits is not None and credits > budget:
        raise ApiError(400, "invalid credits: more than the budget")
    return JobSpec(
        job_id=body.job_id,
        workload=body.workload,
        lease=timedelta(seconds=body.lease_seconds),
        budget=budget,
        runtime=body.runtime,
        input=body.input,
        min_vram_mb=requirements.min_vram_mb if requirements else None,
        region=requirements.region if requirements else None,
        platform=requirements.platform if requirements else None,
        artefacts=msgspec.to_builtins(body.artefacts()),
        credits=credits,
    )


def _same_job(job: Job, spec: JobSpec, island_id: Any) -> bool:
    """Whether `job` is what `spec` submits: a retry after a lost answer, not a new job."""
    first = job.attempts.order_by("number").values_list("island_id", flat=True).first()
    return (
        job.workload == spec.workload
        and job.runtime == spec.runtime
        and job.input == spec.input
        and job.budget == spec.budget
        and job.requirements == spec.requirements()
        and job.artefacts == spec.artefacts
        and job.lease_seconds == int(spec.lease.total_seconds())
        and (spec.credits is None or (job.fixed_credits and job.credits == spec.credits))
        and (island_id is None or first == island_id)
    )


def _job_json(job: Job, history: bool = False) -> dict[str, Any]:
    island = job.island
    answer: dict[str, Any] = {
        "job_id": job.job_id,
        "island_id": str(island.pk) if island else None,
        "host_id": island.host_id if island else None,
        "workload": job.workload,
        "runtime": job.runtime,
        "credits": str(job.credits),
        "budget": str(job.budget),
        "state": job.state,
        "attempt": job.attempt,
        "assigned_at": job.assigned_at.isoformat(),
        "lease_expires_at": job.lease_expires_at.isoformat(),
    }
    if history:
        answer |= {
            "started_at": job.started_at.isoformat() if job.started_at else None,
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
            "error": job.error,
            "attempts": [
                {
                    "attempt": attempt.number,
                    "island_id": str(attempt.island_id),
                    "host_id": attempt.island.host_id,
                    "assigned_at": attempt.assigned_at.isoformat(),
                    "started_at": attempt.started_at.isoformat() if attempt.started_at else None,
                    "finished_at": attempt.finished_at.isoformat() if attempt.finished_at else None,
                    "outcome": attempt.outcome or None,
                    "credits": str(attempt.credits),
                }
                for attempt in job.attempts.select_related("island").order_by("number")
            ],
        }
    return answer


@json_api
def api_jobs(request: HttpRequest) -> HttpResponse:
    """The dispatcher submits a job: placed by the coordinator, or given to the Island it names.

    Idempotent per job_id: the same body again answers the same placement.
    """
    key = _dispatcher(request)
    body = parse_body(request, JobSubmission, JOB_SUBMISSION_MAX_BYTES)
    spec = _spec(body)
    island = None
    if body.island_id is not None:
        island = Island.objects.active().filter(pk=body.island_id).first()
        if island is None:
            raise ApiError(404, f"no active Island {body.island_id}")
    try:
        job = Job.objects.submit(spec, island=island, key=key)
    except DuplicateJob as exc:
        # A dispatcher retrying after a lost answer gets the same job back;
        # the same id for a different job is a conflict.
        if not _same_job(exc.existing, spec, body.island_id):
            raise ApiError(409, f"{exc}, with another body") from None
        existing = Job.objects.select_related("island").get(pk=exc.existing.pk)
        return JsonResponse({"success": True, "created": False, "job": _job_json(existing)})
    except IslandIneligible as exc:
        raise ApiError(409, str(exc), fields={"rule": exc.rule.name}) from None
    except NoEligibleIsland as exc:
        logger.info("event=job_unplaced job_id=%s key=%s reasons=%s", spec.job_id, key.name, exc.reasons)
        raise ApiError(
            503,
            "no eligible island",
            {"Retry-After": str(NO_ISLAND_RETRY_AFTER)},
            fields={"reasons": exc.reasons},
        ) from None
    logger.info(
        "event=job_placed job_id=%s island_id=%s credits=%s key=%s",
        job.job_id,
        job.island_id,
        job.credits,
        key.name,
    )
    return JsonResponse({"success": True, "created": True, "job": _job_json(job)}, status=201)


def _dispatched(job_id: str) -> Job:
    job = (
        Job.objects.select_related("island").filter(job_id=job_id).first() if _JOB_ID.match(job_id) else None
    )
    if job is None:
        raise ApiError(404, "no such job")
    return job


@json_api(methods=("GET",))
def api_job(request: HttpRequest, job_id: str) -> HttpResponse:
    """A job as the dispatcher follows it: its state, its Island, and every attempt."""
    _dispatcher(request)
    return JsonResponse({"success": True, "job": _job_json(_dispatched(job_id), history=True)})


@json_api
def api_job_cancel(request: HttpRequest, job_id: str) -> HttpResponse:
    """The dispatcher withdraws a job that has not ended; its Island is told, and loses nothing."""
    _dispatcher(request)
    _dispatched(job_id)
    try:
        Job.objects.cancel(job_id)
    except JobStateConflict as exc:
        raise ApiError(409, str(exc)) from None
    return JsonResponse({"success": True, "job": _job_json(_dispatched(job_id), history=True)})


# --- The person's side: "Your Islands" ---------------------------------------


def _render_settings(
    request: AuthenticatedHtmxRequest, extra: dict[str, Any] | None = None, status: int = 200
) -> HttpResponse:
    # One query for all the cards: everything a card shows is on the Island
    # row, and statuses are computed against one clock reading. The summary
    # costs two more, and the Island keys one, whatever the number of Islands.
    now = timezone.now()
    owned = Island.objects.owned_by(request.user)
    view = FleetView.from_query(request.GET)
    summary = owned.summary(now)
    islands = view.islands(owned, now)
    # The list is rendered again when its next card changes by the clock alone.
    changes = [when for island in islands if (when := island.shown_until(now)) is not None]
    context = {
        "islands": islands,
        "next_change": min(changes, default=None),
        "keys": IslandKey.objects.owned_by(request.user),
        "summary": summary,
        "view": view,
        "layout": view.layout_for(summary.total),
        "sorts": SORTS,
        "filterable": FILTERABLE,
        "now": now,
        **(extra or {}),
    }
    template = "islands/settings.html#island-list" if request.htmx else "islands/settings.html"
    return render(request, template, context, status=status)


@login_required
def settings_page(request: AuthenticatedHtmxRequest) -> HttpResponse:
    """ "Your Islands". With htmx (the Refresh button) only the list is rendered."""
    return _render_settings(request)


@login_required
@require_POST
def rename(request: AuthenticatedHtmxRequest, pk: str) -> HttpResponse:
    island = _island_for(request, pk)
    form = RenameIslandForm(request.POST, instance=island)
    if not form.is_valid():
        return _render_settings(request, {"rename_form": form, "renaming": island.pk}, status=400)
    # Only the name is written: the row may have moved on (a heartbeat, a
    # finished job) since this request loaded it.
    form.save(commit=False)
    island.save(update_fields=["name"])
    messages.success(request, f"Island renamed to “{island.name}”.")
    return redirect("islands:settings")


@login_required
@require_POST
def remove(request: AuthenticatedHttpRequest, pk: str) -> HttpResponse:
    """Unlink an Island. Its API token stops working at once."""
    island = _island_for(request, pk)
    island.remove()
    messages.success(request, f"Island “{island.name}” was removed. Its token no longer works.")
    return redirect("islands:settings")


@login_required
@require_POST
def revoke_key(request: AuthenticatedHttpRequest, pk: int) -> HttpResponse:
    """Revoke an Island key: the NATS auth callout refuses it from now on."""
    key = get_object_or_404(IslandKey, pk=pk, owner=request.user)
    if key.revoke():
        logger.info(
            "event=island_key_revoked user_id=%s key=%s host_id=%s",
            request.user.pk,
            key.username,
            key.host_id,
        )
    messages.success(request, f"Key {key.username} is revoked. An Island using it can no longer connect.")
    return redirect("islands:settings")


@login_required
def detail(request: AuthenticatedHttpRequest, pk: str) -> HttpResponse:
    """One Island: its card's details, its last 30 days, its newest attempts and karma events."""
    island = _island_for(request, pk)
    events = island.karma_events.order_by("-id")[:KARMA_EVENTS_SHOWN]
    attempts = island.attempts.select_related("job").order_by("-assigned_at", "-pk")[:ATTEMPTS_SHOWN]
    now = timezone.now()
    context = {
        "island": island,
        "history": island_history(island, now),
        "events": events,
        "shown": KARMA_EVENTS_SHOWN,
        "attempts": attempts,
        "attempts_shown": ATTEMPTS_SHOWN,
        "now": now,
    }
    return render(request, "islands/detail.html", context)
