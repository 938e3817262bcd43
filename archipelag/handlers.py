"""The JSON API's own request handler: Django without the browser stack.

Islands, phones and dispatchers send no cookies and need none of the
sessions, CSRF, authentication, messages, htmx or static files that pages
need; under ASGI each of those middleware costs a thread hop or two per
request (docs/performance.md). asgi.py sends every request under /api/ to
`ApiASGIHandler`, whose middleware is `settings.API_MIDDLEWARE`, and every
other request to Django's handler with `settings.MIDDLEWARE`.
"""

from collections.abc import Callable
from inspect import iscoroutinefunction
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response
from django.utils.module_loading import import_string

API_PREFIX = "/api/"


def is_api_path(path: str) -> bool:
    """Whether a request path (without the script prefix) belongs to the JSON API."""
    return path.startswith(API_PREFIX)


def load_api_middleware(handler: Any, is_async: bool) -> None:
    """Build `handler`'s middleware chain (a BaseHandler's) from settings.API_MIDDLEWARE.

    Django's own `load_middleware` reads settings.MIDDLEWARE and nothing
    else. The API's middleware is short and each one runs in both modes, so
    the chain is built without the adapters that switch between sync and
    async (the thread hops this handler exists to avoid); a middleware that
    cannot run in the handler's mode is a configuration error.
    """
    handler._view_middleware = []
    handler._template_response_middleware = []
    handler._exception_middleware = []
    get_response: Callable[..., Any] = handler._get_response_async if is_async else handler._get_response
    chain = convert_exception_to_response(get_response)
    for path in reversed(settings.API_MIDDLEWARE):
        middleware = import_string(path)
        if not getattr(middleware, "async_capable" if is_async else "sync_capable", not is_async):
            mode = "async" if is_async else "sync"
            raise ImproperlyConfigured(f"API_MIDDLEWARE: {path} cannot run in {mode} mode")
        instance = middleware(chain)
        if is_async and not iscoroutinefunction(instance):
            raise ImproperlyConfigured(f"API_MIDDLEWARE: {path} did not become a coroutine function")
        chain = convert_exception_to_response(instance)
    handler._middleware_chain = chain


class ApiASGIHandler(ASGIHandler):
    """Django's ASGI handler with settings.API_MIDDLEWARE in place of settings.MIDDLEWARE."""

    def load_middleware(self, is_async: bool = False) -> None:
        load_api_middleware(self, is_async)
