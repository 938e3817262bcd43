import logging
import re
from datetime import timedelta
from decimal import Decimal
from typing import Any

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
    EnhancedHeartbeat,
    JobAssignment,
    JobStatus,
)
from islands.forms import RenameIslandForm
from islands.groupcommit import GroupCommit, GroupCommitFailed
from islands.models import (
    CREDITS_PLACES,
    MAX_JOB_CREDITS,
    Beat,
    DispatcherKey,
    DuplicateJob,
    HeartbeatOutcome,
    Island,
    IslandUnavailable,
    Job,
    JobNotFound,
    JobStateConflict,
    hash_token,
)

logger = logging.getLogger("archipelag.islands")

BEARER_CHALLENGE = {"WWW-Authenticate": "Bearer"}
UNAUTHORIZED = "unknown, revoked or expired token: send Authorization: Bearer <token>"
# An Island polling for work gets at most this many jobs at once.
POLL_LIMIT = 32
# The Island page lists this many of its newest karma events.
KARMA_EVENTS_SHOWN = 50
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
def api_heartbeat(request: HttpRequest) -> HttpResponse:
    """Record an Island's heartbeat: 200 once it is committed.

    The token is checked by the same locking read that writes the beat, in a
    batch with the heartbeats arriving at the same moment, so a heartbeat
    costs no query of its own. A body that cannot be read goes through the
    same batch unwritten, so an unknown token is told so first, as on every
    endpoint.
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
        outcome = heartbeat_commits.submit(Beat(heartbeat, received_at, token_hash=token_hash))
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
def api_jobs_poll(request: HttpRequest) -> HttpResponse:
    """The jobs given to the calling Island that it has not started, oldest first.

    Separate from the heartbeat so the heartbeat stays one lean write; fields
    are named as in the agent's AssignJob.
    """
    island = _calling_island(request)
    jobs = Job.objects.waiting_for(island)[:POLL_LIMIT]
    return JsonResponse(
        {
            "success": True,
            "jobs": [
                {
                    "job_id": job.job_id,
                    "workload_id": job.workload,
                    "credits": str(job.credits),
                    "lease_expires": int(job.lease_expires_at.timestamp() * 1000),
                }
                for job in jobs
            ],
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
    except JobStateConflict as exc:
        raise ApiError(409, str(exc)) from None
    if outcome.applied:
        logger.info("event=job_status job_id=%s island_id=%s state=%s", job_id, island.pk, outcome.state)
    return JsonResponse({"success": True, "applied": outcome.applied, "state": outcome.state})


# --- The dispatcher's side ---------------------------------------------------------


def _credits(sent: str | int | float) -> Decimal:
    if isinstance(sent, str):
        if not _CREDITS_TEXT.fullmatch(sent):
            raise ApiError(400, 'invalid credits: a decimal string such as "2.5", or a number')
        value = Decimal(sent)
    elif isinstance(sent, int):
        value = Decimal(sent)
    else:
        # A JSON number with a fraction is decoded as a float; its shortest
        # repr is the literal that was sent for any amount in range (at most
        # 12 significant digits), so nothing is lost on the way.
        value = Decimal(repr(sent))
    if not value.is_finite() or value < 0 or value > MAX_JOB_CREDITS:
        raise ApiError(400, f"invalid credits: a number from 0 to {MAX_JOB_CREDITS}")
    if value != value.quantize(CREDITS_PLACES):
        raise ApiError(400, "invalid credits: at most 4 decimal places")
    return value


def _job_json(job: Job) -> dict[str, Any]:
    return {
        "job_id": job.job_id,
        "island_id": str(job.island_id),
        "workload": job.workload,
        "credits": str(job.credits),
        "state": job.state,
        "assigned_at": job.assigned_at.isoformat(),
        "lease_expires_at": job.lease_expires_at.isoformat(),
    }


@json_api
def api_jobs(request: HttpRequest) -> HttpResponse:
    """The dispatcher records a job it gave an Island (idempotent per job_id)."""
    key = DispatcherKey.objects.authenticate(bearer_token(request) or "")
    if key is None:
        raise ApiError(401, "unknown or revoked dispatcher key", BEARER_CHALLENGE)
    body = parse_body(request, JobAssignment)
    credits = _credits(body.credits)
    island = Island.objects.active().filter(pk=body.island_id).first()
    if island is None:
        raise ApiError(404, f"no active Island {body.island_id}")
    try:
        job = Job.objects.assign(
            island=island,
            job_id=body.job_id,
            workload=body.workload,
            credits=credits,
            lease=timedelta(seconds=body.lease_seconds),
        )
    except IslandUnavailable as exc:
        raise ApiError(409, str(exc)) from None
    except DuplicateJob as exc:
        # A dispatcher retrying after a lost answer gets the same job back;
        # the same id for a different job is a conflict.
        same = (exc.existing.island_id, exc.existing.workload, exc.existing.credits) == (
            island.pk,
            body.workload,
            credits,
        )
        if not same:
            raise ApiError(409, str(exc)) from None
        return JsonResponse({"success": True, "created": False, "job": _job_json(exc.existing)})
    logger.info("event=job_assigned job_id=%s island_id=%s key=%s", job.job_id, island.pk, key.name)
    return JsonResponse({"success": True, "created": True, "job": _job_json(job)}, status=201)


# --- The person's side: "Your Islands" ---------------------------------------


def _render_settings(
    request: AuthenticatedHtmxRequest, extra: dict[str, Any] | None = None, status: int = 200
) -> HttpResponse:
    # One query for all the cards: everything a card shows is on the Island
    # row, and statuses are computed against one clock reading.
    context = {
        "islands": Island.objects.owned_by(request.user),
        "now": timezone.now(),
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
def detail(request: AuthenticatedHttpRequest, pk: str) -> HttpResponse:
    """One Island: its card's details and its newest karma events, each with its reason."""
    island = _island_for(request, pk)
    events = island.karma_events.order_by("-id")[:KARMA_EVENTS_SHOWN]
    context = {"island": island, "events": events, "shown": KARMA_EVENTS_SHOWN, "now": timezone.now()}
    return render(request, "islands/detail.html", context)
