from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from archipelag.api import ApiError, bearer_token, json_api, parse_body
from archipelag.htmx import HtmxHttpRequest
from islands.agent import EnhancedHeartbeat
from islands.models import Island

# A heartbeat from a big server (many GPUs, many running jobs) is a few KiB;
# four times the usual API limit leaves room without inviting abuse.
HEARTBEAT_MAX_BODY_BYTES = 64 * 1024
BEARER_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _island_for(request: HttpRequest, pk: str) -> Island:
    """One of the signed-in user's active Islands, or 404 (never another user's)."""
    return get_object_or_404(Island.objects.owned_by(request.user), pk=pk)  # type: ignore[arg-type]


def _calling_island(request: HttpRequest) -> Island:
    """The Island whose API token the request carries, or a 401.

    One indexed query on the token's hash: the token is the Island's only
    credential, so an Island can only ever act on itself.
    """
    token = bearer_token(request)
    island = Island.objects.authenticate(token) if token else None
    if island is None:
        raise ApiError(
            401, "unknown, revoked or expired token: send Authorization: Bearer <token>", BEARER_CHALLENGE
        )
    return island


# --- The Island's side: JSON API -------------------------------------------


@json_api
def api_heartbeat(request: HttpRequest) -> HttpResponse:
    received_at = timezone.now()
    island = _calling_island(request)
    heartbeat = parse_body(request, EnhancedHeartbeat, HEARTBEAT_MAX_BODY_BYTES)
    if heartbeat.host_id is not None and heartbeat.host_id != island.host_id:
        raise ApiError(403, "host_id is not the host of the Island this token belongs to")
    applied = Island.objects.record_heartbeats([(island.pk, heartbeat, received_at)])
    # Not applied: removed since the token was checked, or a newer heartbeat
    # of this Island overtook this one (which is fine, and still a success).
    if not applied and not Island.objects.active().filter(pk=island.pk).exists():
        raise ApiError(401, "this Island was removed; its token no longer works", BEARER_CHALLENGE)
    return JsonResponse({"success": True})


# --- The person's side: "Your Islands" ---------------------------------------


@login_required
def settings_page(request: HtmxHttpRequest) -> HttpResponse:
    """ "Your Islands". With htmx (the Refresh button) only the list is rendered."""
    islands = Island.objects.owned_by(request.user)  # type: ignore[arg-type]
    template = "islands/settings.html#island-list" if request.htmx else "islands/settings.html"
    return render(request, template, {"islands": islands})


@login_required
@require_POST
def remove(request: HttpRequest, pk: str) -> HttpResponse:
    """Unlink an Island. Its API token stops working at once."""
    island = _island_for(request, pk)
    island.remove()
    messages.success(request, f"Island “{island.name}” was removed. Its token no longer works.")
    return redirect("islands:settings")
