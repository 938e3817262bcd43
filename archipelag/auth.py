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
  (half its cores by default), on threads of their own at a lower CPU
  priority, so the rest of the CPU stays with the requests that need
  little of it. An attempt that waits longer than PASSWORD_HASHING_WAIT
  seconds for its turn is answered 503, to retry;
- the backend gives the request's pooled connection back between looking
  the account up and hashing, so a login holds a connection for the
  length of one indexed query, not of a hash.

The site's login page and the admin's share the form (archipelag.views and
archipelag.admin). Signup hashes through `hash_in_turn()` too (notify.views).
"""

import contextlib
import hashlib
import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from asgiref.sync import sync_to_async
from django import forms
from django.conf import settings
from django.contrib.auth import check_password_with_timing_attack_mitigation
from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.models import User
from django.db import connection, connections
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


# Hashes run on a small pool of threads of their own, at a lower CPU
# priority than the threads answering requests: hashing is the one
# CPU-heavy thing a web process does, and when the machine is busy a
# heartbeat should not wait behind it. Requests wait for their hash holding
# no database connection.
HASHING_NICE = 10
_executor: ThreadPoolExecutor | None = None
_executor_size = 0
_executor_lock = threading.Lock()


def _background_priority() -> None:
    # Linux schedules threads as tasks of their own, so this lowers the
    # priority of this hashing thread only. Elsewhere PRIO_PROCESS would
    # take a thread id for a process id: leave the priority alone there.
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASHING_NICE)


def _hashers() -> tuple[ThreadPoolExecutor, int]:
    global _executor, _executor_size
    size = max(1, int(settings.PASSWORD_HASHING_CONCURRENCY))
    with _executor_lock:
        if _executor is None or _executor_size != size:
            if _executor is not None:
                _executor.shutdown(wait=False)
            _executor = ThreadPoolExecutor(
                max_workers=size, thread_name_prefix="password-hashing", initializer=_background_priority
            )
            _executor_size = size
        return _executor, size


def _run_hash[T](function: Callable[..., T], *args: Any) -> T:
    try:
        return function(*args)
    finally:
        # A hash that upgrades the stored one saves the user from this
        # thread: give that connection back, as a request would.
        connections.close_all()


def hash_in_turn[T](function: Callable[..., T], *args: Any) -> T:
    """Run `function(*args)`, a password hash, on a hashing thread; raise HashingBusy if none is free in time.

    At most PASSWORD_HASHING_CONCURRENCY run at once. One that has not
    started within PASSWORD_HASHING_WAIT seconds is withdrawn and never
    runs; one that has started is waited for. The caller gives its pooled
    connection back first (`release_connection()`).
    """
    executor, size = _hashers()
    future = executor.submit(_run_hash, function, *args)
    try:
        return future.result(timeout=settings.PASSWORD_HASHING_WAIT)
    except FutureTimeout:
        if future.cancel():
            logger.warning("event=password_hashing_busy threads=%s", size)
            raise HashingBusy from None
        return future.result()


def release_connection() -> None:
    """Give the request's pooled database connection back before slow work that needs none.

    The next query takes a connection from the pool again. Only pooled
    connections are shared, so others are left alone, and so is one inside a
    transaction (closing it would roll the transaction back).
    """
    if getattr(connection, "pool", None) is not None and not connection.in_atomic_block:
        connection.close()


class PoolFriendlyModelBackend(ModelBackend):
    """Django's ModelBackend, hashing in turn (hash_in_turn) and without holding a database connection."""

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
        try:
            user: User | None = User._default_manager.get_by_natural_key(username)
        except User.DoesNotExist:
            user = None
        release_connection()
        # An unknown name costs a hash too, so the answer's timing does not
        # tell which accounts exist.
        matched = hash_in_turn(check_password_with_timing_attack_mitigation, user, password)
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
        # ModelBackend's own async version would hash outside the turns.
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
