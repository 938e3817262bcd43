"""Request types for views, so `request.user` and `request.htmx` are typed as they are."""

from django.contrib.auth.models import User
from django.http import HttpRequest
from django_htmx.middleware import HtmxDetails


class HtmxHttpRequest(HttpRequest):
    """The request type of views that look at `request.htmx` (set by HtmxMiddleware)."""

    htmx: HtmxDetails


class AuthenticatedHttpRequest(HttpRequest):
    """The request of a view behind @login_required: its user is signed in."""

    user: User


class AuthenticatedHtmxRequest(AuthenticatedHttpRequest, HtmxHttpRequest):
    """Both: a signed-in user's request to a view that serves htmx partials."""
