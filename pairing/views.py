import csv
import logging
import uuid
from datetime import datetime
from typing import Any

import segno
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from archipelag import ratelimit
from archipelag.api import ApiError, client_ip, json_api, parse_body, retry_later
from archipelag.http import AuthenticatedHtmxRequest
from islands.agent import HostRegistration, PollRequest
from islands.mobile import MobilePairRequest
from islands.models import Island, IslandKey, IssuedKey
from pairing import limits
from pairing.codes import MalformedCode, normalize_code
from pairing.forms import IslandKeyForm, PairCodeForm
from pairing.models import (
    POLL_INTERVAL,
    BadDeviceSecret,
    CodeExpired,
    CodeJustUsed,
    HostAlreadyLinked,
    HostIdTaken,
    IssueRefused,
    MobilePairingSession,
    PairingCode,
    PairingError,
    PollTooFast,
    TokenAlreadyCollected,
    mask_name,
)

logger = logging.getLogger("archipelag.pairing")

# Form errors answer 422: htmx swaps the form with its messages into place,
# and django-htmx's DEBUG script, which replaces the whole page on a 400,
# leaves it alone.
FORM_ERROR = 422


# --- The Island's side: JSON API -------------------------------------------


@json_api
def api_pairing(request: HttpRequest) -> HttpResponse:
    now = timezone.now()
    body = parse_body(request, HostRegistration)
    try:
        issued = PairingCode.objects.request(
            body, channel=PairingCode.Channel.HTTP, ip=client_ip(request), now=now
        )
    except HostAlreadyLinked:
        # The real agent matches this exact lowercase text.
        raise ApiError(409, "already paired") from None
    except IssueRefused as exc:
        raise retry_later(exc.status, str(exc), exc.retry_after) from None
    return JsonResponse(
        {
            "success": True,
            "code": issued.code,
            "expires_in_seconds": issued.row.expires_in_seconds(now),
            "pair_url": issued.pair_url,
            "device_secret": issued.device_secret,
            "poll_interval_seconds": int(POLL_INTERVAL.total_seconds()),
        },
        status=201,
    )


@json_api
def api_pairing_poll(request: HttpRequest) -> HttpResponse:
    body = parse_body(request, PollRequest)
    try:
        answer = PairingCode.objects.poll(body.host_id, body.device_secret)
    except BadDeviceSecret as exc:
        raise ApiError(401, str(exc)) from None
    except PollTooFast:
        raise retry_later(429, "slow_down", int(POLL_INTERVAL.total_seconds())) from None
    except TokenAlreadyCollected as exc:
        raise ApiError(410, str(exc)) from None
    if answer["status"] == "paired":
        logger.info("event=token_issued host_id=%s island_id=%s", body.host_id, answer["island_id"])
    return JsonResponse(dict(answer))


# --- The person's side: /pair ------------------------------------------------


def _render_step(
    request: AuthenticatedHtmxRequest, context: dict[str, Any], status: int = 200
) -> HttpResponse:
    # One view serves the whole page and, for htmx, just the step that changes.
    template = "pairing/pair.html#step" if request.htmx else "pairing/pair.html"
    context.setdefault("key_form", IslandKeyForm())
    response = render(request, template, context, status=status)
    if "retry_after" in context:
        response["Retry-After"] = str(context["retry_after"])
    return response


def _limited(
    request: AuthenticatedHtmxRequest, form: PairCodeForm, exc: ratelimit.RateLimited
) -> HttpResponse:
    logger.warning(
        "event=rate_limited action=redeem_code user_id=%s ip=%s limit=%s",
        request.user.pk,
        client_ip(request),
        exc.limit.name,
    )
    error = f"Too many wrong codes from {exc.limit.per}. Try again in {exc.wait_words}."
    return _render_step(request, {"form": form, "error": error, "retry_after": exc.retry_after}, status=429)


def _unavailable(
    request: AuthenticatedHtmxRequest, form: PairCodeForm, exc: ratelimit.Unavailable
) -> HttpResponse:
    """The wrong-code counters are out of reach: typed codes wait rather than go uncounted."""
    error = f"Linking Islands is unavailable for a moment. Try again in {exc.wait_words}."
    return _render_step(request, {"form": form, "error": error, "retry_after": exc.retry_after}, status=503)


def _failed(request: AuthenticatedHtmxRequest, form: PairCodeForm, exc: PairingError) -> HttpResponse:
    """A wrong or expired code, already counted against the limits: say what happened."""
    return _render_step(request, {"form": form, "error": str(exc)}, status=FORM_ERROR)


def _linked_elsewhere(request: AuthenticatedHtmxRequest, form: PairCodeForm, island: Island) -> HttpResponse:
    if island.owner_id == request.user.pk:
        error = f"This Island is already linked to your account as “{island.name}”."
    else:
        error = (
            "This Island is already linked to another account. Its owner must remove it "
            "from their Islands before it can be linked to yours."
        )
    return _render_step(request, {"form": form, "error": error}, status=409)


def _lookup(
    request: AuthenticatedHtmxRequest, form: PairCodeForm, now: datetime
) -> tuple[PairingCode, ratelimit.Attempt]:
    """The live code the form names, and the attempt counted for it.

    The attempt is counted before the code is looked at (past a limit even
    the right code teaches a guesser nothing) and stays counted only if the
    code is wrong: a code that exists, even one linked already, is refunded
    here. Raises PairingError, RateLimited or Unavailable.
    """
    counted = ratelimit.attempt(limits.redeem_buckets(ip=client_ip(request), user_id=request.user.pk), now)
    try:
        row = PairingCode.objects.lookup(form.cleaned_data["code"], now)
    except (HostAlreadyLinked, CodeJustUsed):
        # The right code, linked already or just redeemed by a racing
        # confirm: not a guess.
        ratelimit.refund(counted)
        raise
    return row, counted


@login_required
def pair(request: AuthenticatedHtmxRequest) -> HttpResponse:
    """Step one: type the code. Step two: see what it links, and confirm."""
    if request.method != "POST":
        return _render_step(request, {"form": PairCodeForm()})
    now = timezone.now()
    form = PairCodeForm(request.POST)
    if not form.is_valid():
        return _render_step(request, {"form": form}, status=FORM_ERROR)
    try:
        row, counted = _lookup(request, form, now)
    except ratelimit.RateLimited as exc:
        return _limited(request, form, exc)
    except ratelimit.Unavailable as exc:
        return _unavailable(request, form, exc)
    except HostAlreadyLinked as exc:
        return _linked_elsewhere(request, form, exc.island)
    except PairingError as exc:
        return _failed(request, form, exc)
    ratelimit.refund(counted)
    return _render_step(request, {"form": form, "row": row, "code": form.cleaned_data["code"]})


# --- Island keys: pairing with no code -------------------------------------------


def _keys_csv(issued: list[IssuedKey]) -> HttpResponse:
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = 'attachment; filename="island-keys.csv"'
    writer = csv.writer(response)
    writer.writerow(["host_id", "nats_url"])
    for item in issued:
        writer.writerow([item.key.host_id, item.nats_url])
    return response


@login_required
@require_POST
@never_cache
def add_keys(request: AuthenticatedHtmxRequest) -> HttpResponse:
    """Mint N Island keys and show their config.toml lines once (or hand them over as a CSV)."""
    form = IslandKeyForm(request.POST)
    if not form.is_valid():
        return render(request, "pairing/pair.html", {"form": PairCodeForm(), "key_form": form}, status=400)
    issued = IslandKey.objects.issue(request.user, form.cleaned_data["count"])
    logger.info("event=island_keys_issued user_id=%s count=%s", request.user.pk, len(issued))
    if request.POST.get("format") == "csv":
        return _keys_csv(issued)
    return render(request, "pairing/keys_issued.html", {"issued": issued})


@login_required
@require_POST
def confirm(request: AuthenticatedHtmxRequest) -> HttpResponse:
    now = timezone.now()
    form = PairCodeForm(request.POST)
    if not form.is_valid():
        return _render_step(request, {"form": form}, status=FORM_ERROR)
    try:
        row, counted = _lookup(request, form, now)
    except ratelimit.RateLimited as exc:
        return _limited(request, form, exc)
    except ratelimit.Unavailable as exc:
        return _unavailable(request, form, exc)
    except HostAlreadyLinked as exc:
        return _linked_elsewhere(request, form, exc.island)
    except PairingError as exc:
        return _failed(request, form, exc)
    # The code was live when looked up, so whoever typed it knew it: not a
    # guess, whether this request links the Island or loses a race to
    # another confirm of the same code.
    ratelimit.refund(counted)
    try:
        island = row.redeem(request.user, now)
    except HostAlreadyLinked as exc:
        return _linked_elsewhere(request, form, exc.island)
    except PairingError as exc:
        return _render_step(request, {"form": form, "error": str(exc)}, status=FORM_ERROR)
    logger.info(
        "event=island_linked channel=desktop user_id=%s island_id=%s host_id=%s",
        request.user.pk,
        island.pk,
        island.host_id,
    )
    messages.success(request, f"Island “{island.name}” is now linked to your account.")
    if request.htmx:
        # A full navigation, so the user lands on /settings with its message.
        return HttpResponse(status=204, headers={"HX-Redirect": reverse("islands:settings")})
    return redirect("islands:settings")


# --- Mobile pairing: the phone's side ------------------------------------------


def _typed_codes_unavailable(exc: ratelimit.Unavailable) -> ApiError:
    return retry_later(
        503,
        f"pairing by typed code is unavailable for a moment; scan the QR code, or retry in {exc.wait_words}",
        exc.retry_after,
    )


@json_api
def api_mobile_pair(request: HttpRequest) -> HttpResponse:
    now = timezone.now()
    body = parse_body(request, MobilePairRequest)
    if (body.code is None) == (body.secret is None):
        raise ApiError(400, "invalid body: send either `code` or `secret`, not both")
    code = None
    if body.code is not None:
        try:
            code = normalize_code(body.code)
        except MalformedCode as exc:
            raise ApiError(400, f"invalid code: {exc}") from None
    ip = client_ip(request)
    by_code = code is not None
    buckets = limits.mobile_redeem_buckets(ip=ip, by_code=by_code)
    # Without its counters a typed code waits (it can be guessed); a scanned
    # secret (256 random bits) pairs uncounted. See archipelag/ratelimit.py.
    fail_open = not by_code
    try:
        # Counted before the code is looked at: past a limit even the right
        # code teaches a guesser nothing, and of any number of concurrent
        # guesses at most the limit get through. Refunded unless wrong.
        counted = ratelimit.attempt(buckets, now, fail_open=fail_open)
    except ratelimit.RateLimited as exc:
        logger.warning("event=rate_limited action=mobile_redeem ip=%s limit=%s", ip, exc.limit.name)
        raise retry_later(
            429, f"too many wrong codes from {exc.limit.per}; retry in {exc.wait_words}", exc.retry_after
        ) from None
    except ratelimit.Unavailable as exc:
        raise _typed_codes_unavailable(exc) from None
    try:
        paired = MobilePairingSession.objects.redeem(
            code=code, secret=body.secret, host_id=body.host_id, device=body.device, ip=ip, now=now
        )
    except HostIdTaken as exc:
        # Not a guess: the code was right, so it is not counted, and not used up.
        ratelimit.refund(counted)
        logger.info("event=mobile_pair_refused reason=host_taken host_id=%s ip=%s", body.host_id, ip)
        raise ApiError(409, str(exc)) from None
    except CodeExpired:
        raise ApiError(410, "that code has expired; open /pair/mobile again for a new one") from None
    except CodeJustUsed:
        # The right code, redeemed a moment ago (by a racing request of this
        # phone, or another phone that read the same screen): not a guess.
        ratelimit.refund(counted)
        raise ApiError(401, f"unknown or already used {'code' if by_code else 'QR code'}") from None
    except PairingError:
        what = "code" if by_code else "QR code"
        raise ApiError(401, f"unknown or already used {what}") from None
    ratelimit.refund(counted)
    island = paired.island
    logger.info(
        "event=island_linked channel=mobile via=%s user_id=%s island_id=%s host_id=%s ip=%s",
        paired.session.redeemed_via,
        island.owner_id,
        island.pk,
        island.host_id,
        ip,
    )
    return JsonResponse(
        {
            "success": True,
            "island_id": str(island.pk),
            "token": paired.token,
            "token_expires_at": island.token_expires_at,
            "account": mask_name(island.owner.get_username()),
        },
        status=201,
    )


# --- Mobile pairing: the person's side -------------------------------------------


def _qr_data_uri(payload: str) -> str:
    """The QR code as a PNG data URI: black on white with the 4-module quiet zone
    the standard asks for, whatever the page's theme, and never a file on disk."""
    return str(segno.make(payload, error="m").png_data_uri(scale=6, border=4, dark="#000", light="#fff"))


@login_required
@require_http_methods(["GET", "POST"])
@never_cache
def pair_mobile(request: AuthenticatedHtmxRequest) -> HttpResponse:
    """Open a pairing session and show its QR code, code and countdown.

    Every load opens a fresh session: the code and secret exist in plain text
    only in this response. The "Get a new code" button POSTs here with htmx
    and swaps in just the session partial.
    """
    now = timezone.now()
    template = "pairing/pair_mobile.html#session" if request.htmx else "pairing/pair_mobile.html"
    buckets = limits.mobile_open_buckets(user_id=request.user.pk)
    try:
        # Fails open: opening retires the account's earlier session, so the
        # number of live mobile codes does not depend on this count.
        ratelimit.attempt(buckets, now, fail_open=True)
    except ratelimit.RateLimited as exc:
        error = f"You opened many pairing codes in a short time. Try again in {exc.wait_words}."
        response = render(request, template, {"error": error}, status=429)
        response["Retry-After"] = str(exc.retry_after)
        return response
    opened = MobilePairingSession.objects.open(request.user, now)
    session = opened.row
    expires_in = session.expires_in_seconds(now)
    context = {
        "session": session,
        "code": opened.code,
        "qr": _qr_data_uri(opened.scan_url),
        "expires_in": expires_in,
        "countdown": f"{expires_in // 60}:{expires_in % 60:02d}",
        "socket_path": f"/ws/pair/mobile/{session.id}/",
    }
    return render(request, template, context)


@require_GET
@never_cache
def mobile_status(request: HttpRequest, session_id: uuid.UUID) -> HttpResponse:
    """The session's snapshot, for the page to poll when its websocket is down.

    Same authorization as the websocket: only the owner. Answered in JSON, not
    with a redirect to the login page, because a script reads it.
    """
    if not request.user.is_authenticated:
        return JsonResponse({"success": False, "error": "sign in again"}, status=401)
    session = (
        MobilePairingSession.objects.owned_by(request.user)
        .select_related("island")
        .filter(pk=session_id)
        .first()
    )
    if session is None:
        # Someone else's session and no session look the same.
        return JsonResponse({"success": False, "error": "no such pairing session"}, status=404)
    return JsonResponse(session.snapshot())


def mobile_scan(request: HttpRequest) -> HttpResponse:
    """Where a QR code leads when a phone's ordinary camera app opens it.

    The code and secret are in the fragment, which never reaches us; this page
    only says to scan with the Archipelag.io app instead.
    """
    return render(request, "pairing/mobile_scan.html")
