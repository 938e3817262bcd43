"""Logging in: counted per account and per address, and password hashing kept off the pool.

A password hash costs a core for a good fraction of a second on purpose,
which makes logins the cheapest way to load the coordinator: 40 concurrent
wrong passwords once held every pooled database connection while they
hashed, and heartbeats waited up to 13.6 s for one (issue 14). So:

- every login attempt is counted first, per account and per address, with
  the counters pairing uses (archipelag/ratelimit.py); a successful one is
  taken back, so only failures count. Over a limit, the form says which
  limit and how long to wait, and the page answers 429 with Retry-After;
- at most PASSWORD_HASHING_CONCURRENCY hashes run at once in a process
  (half its cores by default), so the rest of the CPU stays with the
  requests that need little of it. An attempt that waits longer than
  PASSWORD_HASHING_WAIT seconds for its turn is answered 503, to retry;
- the backend gives the request's pooled connection back between looking
  the account up and hashing, so a login holds a connection for the
  length of one indexed query, not of a hash.

The site's login page and the admin's share the form (archipelag.views and
archipelag.admin). Signup hashes through `hashing_slot()` too (notify.views).
"""

import hashlib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from asgiref.sync import sync_to_async
from django import forms
from django.conf import settings
from django.contrib.auth import check_password_with_timing_attack_mitigation
from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.models import User
from django.db import connection
from django.http import HttpRequest, HttpResponse
from django.utils import timezone

from archipelag import ratelimit
from archipelag.api import client_ip

logger = logging.getLogger("archipelag.auth")

# Failed logins per account: ten tries a quarter of an hour bounds guessing
# at 960 a day whatever the number of addresses, and someone who fills it
# to keep the owner out holds them back a quarter of an hour at a time (the
# message says it is the account that is limited, not their address).
LOGIN_PER_ACCOUNT = ratelimit.Limit("login-account-15m", 10, 15 * 60, "this account")
# Failed logins per address, whatever the account: one address cannot try
# many accounts' common passwords.
LOGIN_PER_ADDRESS = ratelimit.Limit("login-ip-hour", 30, 3600, "this address")


def login_buckets(*, ip: str, username: str) -> list[ratelimit.Bucket]:
    # Usernames are counted hashed: any text fits a cache key that way, and
    # the counters hold no names. Case is folded, so "Alice" and "alice"
    # share a counter (Django usernames are case-sensitive, but the
    # signup form refuses names that differ only in case).
    account = hashlib.sha256(username.casefold().encode()).hexdigest()[:32]
    return [(LOGIN_PER_ACCOUNT, account), (LOGIN_PER_ADDRESS, ip)]


class HashingBusy(Exception):
    """No turn to hash a password came within PASSWORD_HASHING_WAIT seconds."""

    @property
    def retry_after(self) -> int:
        return max(1, int(settings.PASSWORD_HASHING_WAIT))

    @property
    def wait_words(self) -> str:
        return ratelimit.wait_words(self.retry_after)


_slots: threading.BoundedSemaphore | None = None
_slots_size = 0
_slots_lock = threading.Lock()


def _semaphore() -> threading.BoundedSemaphore:
    global _slots, _slots_size
    size = max(1, int(settings.PASSWORD_HASHING_CONCURRENCY))
    with _slots_lock:
        if _slots is None or _slots_size != size:
            _slots, _slots_size = threading.BoundedSemaphore(size), size
        return _slots


@contextmanager
def hashing_slot() -> Iterator[None]:
    """Wait for a turn to hash a password; raise HashingBusy if none comes in time.

    Threads wait here holding no database connection: the caller gives its
    own back first (`release_connection()`), or takes one only inside.
    """
    slots = _semaphore()
    if not slots.acquire(timeout=settings.PASSWORD_HASHING_WAIT):
        logger.warning("event=password_hashing_busy slots=%s", _slots_size)
        raise HashingBusy
    try:
        yield
    finally:
        slots.release()


def release_connection() -> None:
    """Give the request's pooled database connection back before slow work that needs none.

    The next query takes a connection from the pool again. Only pooled
    connections are shared, so others are left alone, and so is one inside a
    transaction (closing it would roll the transaction back).
    """
    if getattr(connection, "pool", None) is not None and not connection.in_atomic_block:
        connection.close()


class PoolFriendlyModelBackend(ModelBackend):
    """Django's ModelBackend, hashing in a slot and without holding a database connection."""

    def authenticate(
        self,
        request: HttpRequest | None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> User | None:
        if username is None:
            username = kwargs.get(User.USERNAME_FIELD)
        if username is None or password is None:
            return None
        with hashing_slot():
            try:
                user: User | None = User._default_manager.get_by_natural_key(username)
            except User.DoesNotExist:
                user = None
            release_connection()
            # An unknown name costs a hash too, so the answer's timing does
            # not tell which accounts exist.
            matched = check_password_with_timing_attack_mitigation(user, password)
        if user is not None and matched and self.user_can_authenticate(user):
            return user
        return None

    async def aauthenticate(
        self,
        request: HttpRequest | None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> User | None:
        # ModelBackend's own async version would skip the slot.
        return await sync_to_async(self.authenticate)(request, username=username, password=password, **kwargs)


class Refusal:
    """Why a login form was refused before the password was checked: the status and wait to answer."""

    def __init__(self, status: int, retry_after: int):
        self.status = status
        self.retry_after = retry_after


class ThrottledAuthenticationForm(AuthenticationForm):
    """Django's login form, counting each attempt first (per account, per address).

    `refusal` is set when the attempt was not checked at all (a limit, or no
    turn to hash); `answer()` gives the response its status and Retry-After.
    """

    refusal: Refusal | None = None

    def clean(self) -> dict[str, Any]:
        username = self.cleaned_data.get("username")
        password = self.cleaned_data.get("password")
        if not (username and password and self.request is not None):
            return super().clean()
        buckets = login_buckets(ip=client_ip(self.request), username=username)
        try:
            # Open when Redis is away: a password (unlike a six-character
            # code) is not what a few minutes of uncounted tries can guess,
            # and a Redis restart must not lock every user out.
            counted = ratelimit.attempt(buckets, timezone.now(), fail_open=True)
        except ratelimit.RateLimited as exc:
            logger.info("event=rate_limited limit=%s ip=%s", exc.limit.name, client_ip(self.request))
            self.refusal = Refusal(429, exc.retry_after)
            raise forms.ValidationError(
                f"Too many failed logins from {exc.limit.per}. Try again in {exc.wait_words}.",
                code="rate_limited",
            ) from None
        try:
            cleaned = super().clean()
        except HashingBusy as exc:
            ratelimit.refund(counted)
            self.refusal = Refusal(503, exc.retry_after)
            raise forms.ValidationError(
                f"Too many logins are being checked right now. Try again in {exc.wait_words}.",
                code="busy",
            ) from None
        if self.get_user() is not None:
            ratelimit.refund(counted)
        return cleaned

    def answer(self, response: HttpResponse) -> HttpResponse:
        if self.refusal is not None:
            response.status_code = self.refusal.status
            response["Retry-After"] = str(self.refusal.retry_after)
        return response
