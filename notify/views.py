import logging

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.contrib.auth.views import PasswordResetView
from django.db import transaction
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from archipelag import ratelimit
from archipelag.api import client_ip
from archipelag.auth import HashingBusy, hash_in_turn, release_connection
from islands.models import Island
from notify import limits
from notify.alerts import island_from_not_me
from notify.context_processors import email_of
from notify.emails import send_confirmation
from notify.forms import EmailForm, PreferencesForm, ResetForm, SignupForm, WebhookForm
from notify.models import (
    KIND_SWITCH_FIELDS,
    KIND_SWITCHES,
    WEBHOOK_EVENTS,
    EmailAddress,
    Preferences,
    WebhookEndpoint,
    send_test_event,
)
from notify.unsubscribe import ALL, read_token

logger = logging.getLogger("notify.views")


def _send_confirmation_throttled(address: EmailAddress) -> ratelimit.RateLimited | None:
    """Count first, per account and per address; send after the commit if within the limits."""
    try:
        ratelimit.take(
            [
                (limits.CONFIRM_PER_ACCOUNT, str(address.user_id)),
                (limits.CONFIRM_PER_ADDRESS, address.email.lower()),
            ],
            timezone.now(),
        )
    except ratelimit.RateLimited as exc:
        return exc
    transaction.on_commit(lambda: send_confirmation(address))
    return None


def _new_user(request: HttpRequest, form: SignupForm, next_url: str) -> User | HttpResponse:
    """The account a valid signup form makes, its password hashed; unsaved.

    Counted first, per address and per network (an account is made whether
    or not its confirmation email goes out), and uncounted while Redis is
    away: the per-address and per-network pairing limits, not the number of
    accounts, bound the odds of guessing a code. The password is hashed in a
    turn of archipelag.auth's, holding no database connection and outside
    the transaction that saves the account. A refusal is the form again,
    saying why and for how long, with 429 or 503 and Retry-After.
    """
    try:
        ratelimit.take(limits.signup_buckets(ip=client_ip(request)), timezone.now(), fail_open=True)
        release_connection()
        user: User = hash_in_turn(form.save, False)
        return user
    except ratelimit.RateLimited as exc:
        error, status, retry_after = (
            f"Too many new accounts from {exc.limit.per}. Try again in {exc.wait_words}.",
            429,
            exc.retry_after,
        )
    except HashingBusy as exc:
        error, status, retry_after = (
            f"Too many accounts are being made right now. Try again in {exc.wait_words}.",
            503,
            exc.retry_after,
        )
    form.add_error(None, error)
    response = render(request, "registration/signup.html", {"form": form, "next": next_url}, status=status)
    response["Retry-After"] = str(retry_after)
    return response


@require_http_methods(["GET", "POST"])
def signup(request: HttpRequest) -> HttpResponse:
    next_url = request.POST.get("next") or request.GET.get("next") or ""
    # Only follow `next` within this site, or signup becomes an open redirect.
    if not url_has_allowed_host_and_scheme(next_url, {request.get_host()}, require_https=request.is_secure()):
        next_url = ""
    if request.user.is_authenticated:
        return redirect(next_url or "islands:settings")
    form = SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = _new_user(request, form, next_url)
        if isinstance(user, HttpResponse):
            return user
        with transaction.atomic():
            user.save()
            form.save_m2m()
            address = EmailAddress.objects.add(user, form.cleaned_data["email"], timezone.now())
            # A new account has counted nothing yet; only the address's own limit can refuse.
            refused = _send_confirmation_throttled(address)
        login(request, user)
        if refused is None:
            messages.info(request, f"We sent a confirmation link to {address.email}.")
        else:
            messages.warning(
                request,
                f"Too many confirmation emails to this address; resend from here in {refused.wait_words}.",
            )
        return redirect(next_url or "islands:settings")
    context = {"form": form, "next": next_url}
    return render(request, "registration/signup.html", context, status=400 if form.errors else 200)


@login_required
@require_POST
def add_email(request: HttpRequest) -> HttpResponse:
    """Add (or change to) an address from /settings; it is used once its link is opened."""
    assert isinstance(request.user, User)
    form = EmailForm(request.POST, user=request.user)
    if not form.is_valid():
        for error in form.errors.get("email", []):
            messages.error(request, f"Email: {error}")
        return redirect("islands:settings")
    with transaction.atomic():
        address = EmailAddress.objects.add(request.user, form.cleaned_data["email"], timezone.now())
        if address.confirmed:
            messages.info(request, f"{address.email} is already your confirmed address.")
            return redirect("islands:settings")
        refused = _send_confirmation_throttled(address)
    if refused is None:
        messages.info(request, f"We sent a confirmation link to {address.email}.")
    else:
        messages.error(
            request,
            f"Too many confirmation emails for {refused.limit.per}; try again in {refused.wait_words}.",
        )
    return redirect("islands:settings")


@login_required
@require_POST
def resend(request: HttpRequest) -> HttpResponse:
    pending = email_of(request.user).pending
    if pending is None:
        messages.info(request, "There is no address waiting for confirmation.")
        return redirect("islands:settings")
    with transaction.atomic():
        refused = _send_confirmation_throttled(pending)
    if refused is None:
        messages.info(request, f"We sent a new confirmation link to {pending.email}.")
    else:
        messages.error(
            request,
            f"Too many confirmation emails for {refused.limit.per}; try again in {refused.wait_words}.",
        )
    return redirect("islands:settings")


@require_GET
def confirm(request: HttpRequest, token: str) -> HttpResponse:
    """Confirm on a plain GET, as the issue asks: the link only proves the inbox is the owner's.

    Mail scanners that open it confirm the address for its owner, which is harmless.
    """
    address, outcome = EmailAddress.objects.confirm_token(token, timezone.now())
    status = 400 if outcome in ("invalid", "taken") else 200
    return render(request, "notify/confirm.html", {"address": address, "outcome": outcome}, status=status)


class ThrottledPasswordResetView(PasswordResetView):
    """Django's password reset, counted per typed address and per client before any email goes out."""

    form_class = ResetForm
    email_template_name = "registration/password_reset_email.txt"
    subject_template_name = "registration/password_reset_subject.txt"

    def form_valid(self, form: ResetForm) -> HttpResponse:  # type: ignore[override]
        try:
            ratelimit.take(
                [
                    (limits.RESET_PER_ADDRESS, form.cleaned_data["email"].strip().lower()),
                    (limits.RESET_PER_CLIENT, client_ip(self.request)),
                ],
                timezone.now(),
            )
        except ratelimit.RateLimited as exc:
            form.add_error(
                "email", f"Too many reset emails for {exc.limit.per}; try again in {exc.wait_words}."
            )
            return self.render_to_response(self.get_context_data(form=form), status=429)
        self.extra_email_context = {"public_url": settings.PUBLIC_URL}
        return super().form_valid(form)


# --- What a host is told ---------------------------------------------------------------


@login_required
@require_http_methods(["GET", "POST"])
def notification_settings(request: HttpRequest) -> HttpResponse:
    """/settings/notifications: the grace, a switch per kind, muted Islands, webhooks."""
    assert isinstance(request.user, User)
    preferences = Preferences.objects.of(request.user)
    islands = [
        (str(pk), name) for pk, name in Island.objects.owned_by(request.user).values_list("pk", "name")
    ]
    form = PreferencesForm(request.POST or None, instance=preferences, islands=islands)
    if request.method == "POST" and form.is_valid():
        form.save()
        messages.success(request, "Your notification settings are saved.")
        return redirect("notify:settings")
    return _settings_page(request, form, WebhookForm(user=request.user))


def _settings_page(
    request: HttpRequest,
    form: PreferencesForm,
    webhook_form: WebhookForm,
    new_secret: str | None = None,
    new_endpoint: WebhookEndpoint | None = None,
) -> HttpResponse:
    assert isinstance(request.user, User)
    context = {
        "form": form,
        "webhook_form": webhook_form,
        "has_email": bool(request.user.email),
        "endpoints": WebhookEndpoint.objects.filter(user=request.user),
        "event_labels": dict(WEBHOOK_EVENTS),
        "new_secret": new_secret,
        "new_endpoint": new_endpoint,
    }
    failed = form.errors or webhook_form.errors
    return render(request, "notify/settings.html", context, status=400 if failed else 200)


def _preferences_form(user: User) -> PreferencesForm:
    islands = [(str(pk), name) for pk, name in Island.objects.owned_by(user).values_list("pk", "name")]
    return PreferencesForm(instance=Preferences.objects.of(user), islands=islands)


@login_required
@require_POST
def add_webhook(request: HttpRequest) -> HttpResponse:
    """Add an endpoint; the answer is the page showing its secret, this once."""
    assert isinstance(request.user, User)
    webhook_form = WebhookForm(request.POST, user=request.user)
    if not webhook_form.is_valid():
        return _settings_page(request, _preferences_form(request.user), webhook_form)
    endpoint, secret = WebhookEndpoint.objects.add(
        request.user, webhook_form.cleaned_data["url"], webhook_form.cleaned_data["events"], timezone.now()
    )
    logger.info("event=webhook_added user_id=%s endpoint_id=%s", request.user.pk, endpoint.pk)
    return _settings_page(
        request, _preferences_form(request.user), WebhookForm(user=request.user), secret, endpoint
    )


def _endpoint_for(request: HttpRequest, pk: int) -> WebhookEndpoint:
    return get_object_or_404(WebhookEndpoint, pk=pk, user=request.user)


@login_required
@require_POST
def webhook_action(request: HttpRequest, pk: int, action: str) -> HttpResponse:
    """Send a test event, pause, resume or delete one of the account's endpoints."""
    endpoint = _endpoint_for(request, pk)
    if action == "test":
        send_test_event(endpoint, timezone.now())
        messages.info(request, f"A test event is on its way to {endpoint.url}; its delivery shows below.")
    elif action == "resume":
        endpoint.resume()
        messages.success(request, f"{endpoint.url} is resumed: new events are sent to it again.")
    elif action == "pause":
        endpoint.pause(timezone.now(), "paused by its owner")
        messages.success(request, f"{endpoint.url} is paused.")
    elif action == "delete":
        endpoint.delete()
        messages.success(request, f"{endpoint.url} is deleted; its secret no longer signs anything.")
    else:
        raise Http404("no such action")
    return redirect("notify:settings")


@csrf_exempt
@require_http_methods(["GET", "POST"])
def unsubscribe(request: HttpRequest, token: str) -> HttpResponse:
    """The link at the foot of every email. A GET asks; the button (or a mail client's
    one-click POST, RFC 8058) turns the switch off. No sign-in: the signed token is the proof,
    and it can only turn emails off. CSRF-exempt for the one-click POST, which carries no cookie."""
    named = read_token(token)
    user = User.objects.filter(pk=named[0]).first() if named else None
    if named is None or user is None:
        return render(request, "notify/unsubscribe.html", {"invalid": True}, status=400)
    kind = named[1]
    switches = [name for name in KIND_SWITCH_FIELDS if kind == ALL or name in KIND_SWITCHES[kind]]
    labels = [str(getattr(Preferences._meta.get_field(name), "verbose_name", name)) for name in switches]
    done = False
    if request.method == "POST":
        preferences, _ = Preferences.objects.get_or_create(user=user)
        for name in switches:
            setattr(preferences, name, False)
        preferences.save(update_fields=switches)
        done = True
    context = {"labels": labels, "done": done, "username": user.get_username()}
    return render(request, "notify/unsubscribe.html", context)


@require_http_methods(["GET", "POST"])
def not_me(request: HttpRequest, token: str) -> HttpResponse:
    """ "This wasn't me": a GET shows the Island and a button; only the button's POST removes it
    (mail scanners open links). The signed token names the Island and its owner."""
    island = island_from_not_me(token)
    if island is None:
        return render(request, "notify/not_me.html", {"invalid": True}, status=400)
    if request.method == "POST":
        island.remove()
        logger.warning(
            "event=island_removed_not_me island_id=%s owner_id=%s host_id=%s",
            island.pk,
            island.owner_id,
            island.host_id,
        )
        return render(request, "notify/not_me.html", {"island": island, "removed": True})
    return render(request, "notify/not_me.html", {"island": island})
