import asyncio
import logging
import sys

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.contrib.auth import views as auth_views
from django.db import connection
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.template import loader
from django.views import defaults
from django.views.decorators.csrf import csrf_exempt

from archipelag.api import (
    DATABASE_RETRY_AFTER,
    TRANSIENT_DATABASE_ERRORS,
    database_unavailable,
    error_response,
)
from archipelag.auth import ThrottledAuthenticationForm
from archipelag.handlers import is_api_path

logger = logging.getLogger(__name__)

HEALTHZ_TIMEOUT = 2.0


def home(request: HttpRequest) -> HttpResponse:
    return render(request, "home.html")


@csrf_exempt
def ping(request: HttpRequest) -> JsonResponse:
    """The cheapest JSON answer the stack can give: no database, no channel layer.

    Clients may use it to check they reach the coordinator; the benchmarks
    use it as the framework's own cost, next to the heartbeat (see
    docs/performance.md). A POST body is accepted and not read.
    """
    if request.method not in ("GET", "POST"):
        # Not require_http_methods: its 405 is an empty text/html answer.
        return error_response(405, "method not allowed: use GET or POST", {"Allow": "GET, POST"})
    return JsonResponse({"success": True})


# Errors Django answers itself, outside any view: in JSON under /api/, where
# clients parse every answer; Django's pages (the site's templates) elsewhere.


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """400s Django raises before a view runs: a Host not in ALLOWED_HOSTS, a malformed request."""
    if is_api_path(request.path):
        return error_response(400, "bad request: the Host header or the request is not accepted")
    return defaults.bad_request(request, exception or Exception())


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if is_api_path(request.path):
        return error_response(404, "no such endpoint: see docs/api.md")
    return defaults.page_not_found(request, exception or Http404())


def database_unavailable_response(request: HttpRequest) -> HttpResponse:
    """503 with Retry-After: JSON under /api/, a short page elsewhere.

    For a database out of reach or a pool with no connection to give within
    its timeout: the request's transaction rolled back, so a retry is safe.
    The page is rendered without the request, so nothing on it (the
    signed-in user, messages) reads the database.
    """
    if is_api_path(request.path):
        unavailable = database_unavailable()
        return error_response(unavailable.status, unavailable.error, unavailable.headers)
    html = loader.get_template("503.html").render({"retry_after": DATABASE_RETRY_AFTER})
    return HttpResponse(html, status=503, headers={"Retry-After": str(DATABASE_RETRY_AFTER)})


def server_error(request: HttpRequest) -> HttpResponse:
    """An exception no view turned into an answer (the traceback is logged by Django).

    A transient database error (a pool timeout) is a 503 to retry, not a
    500: DatabaseUnavailableMiddleware answers those raised by views, and
    this those raised around them (a session saved after the view).
    """
    if isinstance(sys.exception(), TRANSIENT_DATABASE_ERRORS):
        return database_unavailable_response(request)
    if is_api_path(request.path):
        return error_response(500, "the coordinator failed to handle this request")
    return defaults.server_error(request)


class LoginView(auth_views.LoginView):
    """Django's login page, counting attempts first and answering 429/503 with the wait."""

    authentication_form = ThrottledAuthenticationForm

    def form_invalid(self, form: ThrottledAuthenticationForm) -> HttpResponse:  # type: ignore[override]
        return form.answer(super().form_invalid(form))


def _database_ok() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


async def _channel_layer_ok() -> None:
    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("no channel layer configured")
    channel = await layer.new_channel("healthz")
    await layer.send(channel, {"type": "healthz.ping"})
    message = await asyncio.wait_for(layer.receive(channel), timeout=HEALTHZ_TIMEOUT)
    if message.get("type") != "healthz.ping":
        raise RuntimeError("channel layer returned another message")


@csrf_exempt  # JSON for machines, reading no session: a POST hears 405, not the CSRF page's 403
async def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness for load balancers and the container HEALTHCHECK.

    It checks what a request needs: a database query and a round trip
    through the channel layer (Redis in production). The failing part is
    named in the answer; its error detail goes to the log only.
    """
    if request.method not in ("GET", "HEAD"):
        # Any other method ran the checks too (schemathesis: TRACE answered 200).
        return error_response(405, "method not allowed: use GET", {"Allow": "GET, HEAD"})
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(sync_to_async(_database_ok)(), timeout=HEALTHZ_TIMEOUT)
        checks["database"] = "ok"
    except Exception:
        logger.exception("healthz: database check failed")
        checks["database"] = "failing"
    try:
        await _channel_layer_ok()
        checks["channel_layer"] = "ok"
    except Exception:
        logger.exception("healthz: channel layer check failed")
        checks["channel_layer"] = "failing"
    healthy = all(value == "ok" for value in checks.values())
    return JsonResponse({"status": "ok" if healthy else "failing", **checks}, status=200 if healthy else 503)
