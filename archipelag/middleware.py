import logging
from inspect import iscoroutinefunction
from typing import Any
from urllib.parse import urlsplit

from asgiref.sync import markcoroutinefunction
from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.security import SecurityMiddleware
from django.shortcuts import resolve_url
from django.utils.deprecation import MiddlewareMixin

from archipelag.api import TRANSIENT_DATABASE_ERRORS

logger = logging.getLogger("archipelag.api")


class HtmxLoginRedirectMiddleware(MiddlewareMixin):
    """Send the browser, not htmx, to the login page when a session has expired.

    `login_required` answers a 302 to the login page. The browser follows it
    inside htmx's request, and htmx swaps the whole login page, header
    included, into a piece of the page. For htmx requests the redirect
    becomes HX-Redirect instead: htmx navigates the window there, and `next`
    is the page the browser shows, not the fragment's URL.
    """

    def process_response(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        htmx = getattr(request, "htmx", None)
        if not htmx or response.status_code != 302:
            return response
        if urlsplit(response["Location"]).path != resolve_url(settings.LOGIN_URL):
            return response
        next_url = htmx.current_url_abs_path or request.get_full_path()
        login_url = redirect_to_login(next_url)["Location"]
        return HttpResponse(status=204, headers={"HX-Redirect": login_url})


class ApiMiddleware:
    """All the middleware the JSON API runs (settings.API_MIDDLEWARE; archipelag/handlers.py).

    What the browser stack gives every answer and an API client still needs:
    the Host header checked against ALLOWED_HOSTS (a JSON 400 otherwise),
    SecurityMiddleware's HTTPS redirect, HSTS and security headers,
    X-Frame-Options, and a Content-Length. SecurityMiddleware and
    XFrameOptionsMiddleware are used for their checks and headers only:
    called here, in the event loop, they cost no thread hop (their own
    async mode runs each step through sync_to_async). Neither touches the
    database or blocks.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Any):
        self.get_response = get_response
        self.security = SecurityMiddleware(get_response)
        self.frame_options = XFrameOptionsMiddleware(get_response)
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def _before(self, request: HttpRequest) -> HttpResponse | None:
        # Raises DisallowedHost, which Django answers 400 (handler400: JSON under /api/).
        request.get_host()
        return self.security.process_request(request)

    def _after(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        response = self.security.process_response(request, response)
        response = self.frame_options.process_response(request, response)
        if not response.streaming and not response.has_header("Content-Length"):
            response.headers["Content-Length"] = str(len(response.content))
        return response

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        response = self._before(request) or self.get_response(request)
        return self._after(request, response)

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        response = self._before(request) or await self.get_response(request)
        return self._after(request, response)


class DatabaseUnavailableMiddleware(MiddlewareMixin):
    """Answer a view's transient database error with 503 and Retry-After, never a 500.

    A pool with no connection to give within its timeout raises
    OperationalError (psycopg_pool.PoolTimeout), as does a database that went
    away; the JSON API's views answer it themselves (archipelag.api.json_api),
    and this does the same for pages: a short page, or JSON under /api/.
    Last in MIDDLEWARE, so it sees a view's exception first. Errors raised
    outside views reach handler500 (archipelag.views.server_error), which
    answers them the same way.
    """

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not isinstance(exception, TRANSIENT_DATABASE_ERRORS):
            return None
        from archipelag.views import database_unavailable_response

        logger.warning(
            "event=database_unavailable path=%s error=%s",
            request.path,
            type(exception.__cause__ or exception).__name__,
        )
        return database_unavailable_response(request)
