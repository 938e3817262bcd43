"""Who a browser socket belongs to, read inside the consumer's own database call."""

from typing import Any

from django.contrib import auth
from django.contrib.auth.models import AnonymousUser, User


class _SessionOnly:
    """What django.contrib.auth.get_user reads of a request: its session."""

    def __init__(self, session: Any):
        self.session = session


def session_user(scope: dict[str, Any]) -> User | AnonymousUser:
    """The user the socket's session cookie signs in, checked as Django checks a request's.

    Synchronous: call it on the consumer's database thread, together with the
    query it guards. Channels' AuthMiddlewareStack resolves the user in a
    thread hop of its own before the consumer runs, and the consumer then
    hops again for its own query; a socket that needs the user only for one
    query saves a hop by reading both in one call (SessionMiddlewareStack
    still puts the lazy session in the scope). Django's get_user also checks
    the session's auth hash, so a password change signs the socket out too.
    """
    return auth.get_user(_SessionOnly(scope["session"]))  # type: ignore[arg-type]
