import asyncio
import logging

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.db import connection
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views import defaults
from django.views.decorators.csrf import csrf_exempt

from archipelag.api import error_response
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


def server_error(request: HttpRequest) -> HttpResponse:
    """An exception no view turned into an answer (the traceback is logged by Django)."""
    if is_api_path(request.path):
        return error_response(500, "the coordinator failed to handle this request")
    return defaults.server_error(request)


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


async def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness for load balancers and the container HEALTHCHECK.

    It checks what a request needs: a database query and a round trip
    through the channel layer (Redis in production). The failing part is
    named in the answer; its error detail goes to the log only.
    """
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
