"""The JSON API's own request handler: Django without the browser stack.

Islands, phones and dispatchers send no cookies and need none of the
sessions, CSRF, authentication, messages, htmx or static files that pages
need; under ASGI each of those middleware costs a thread hop or two per
request (docs/performance.md). asgi.py sends every request under /api/ to
`ApiASGIHandler`, whose middleware is `settings.API_MIDDLEWARE`, and every
other request to Django's handler with `settings.MIDDLEWARE`.
"""

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from inspect import iscoroutinefunction
from typing import Any

from asgiref.sync import ThreadSensitiveContext
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response
from django.utils.module_loading import import_string

API_PREFIX = "/api/"
# Threads kept for the API's synchronous work, one request at a time each
# (ThreadLanes). More requests than this at once get a thread of their own.
API_THREADS = 32


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


class ThreadLanes:
    """Single-thread executors kept for the life of the process, lent to one request at a time.

    Django runs a request's synchronous work (its request_started and
    request_finished receivers, a sync view, the heartbeat's batch write) on
    one thread of that request's own, so code that expects one thread per
    request gets it; its ASGI handler makes that thread anew for every
    request and stops it after, which was a tenth of the API's CPU
    (docs/performance.md). A lane keeps the same guarantee, one request on
    one thread at a time, without starting a thread per request. Used from
    the event loop only; taking and giving back are single list operations.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._idle: list[ThreadPoolExecutor] = []
        self._made = 0

    def take(self) -> ThreadPoolExecutor | None:
        """An idle lane, a new one while fewer than `limit` exist, else None."""
        try:
            return self._idle.pop()
        except IndexError:
            pass
        if self._made >= self.limit:
            return None
        self._made += 1
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"api-lane-{self._made}")

    def give_back(self, lane: ThreadPoolExecutor) -> None:
        self._idle.append(lane)


class ApiASGIHandler(ASGIHandler):
    """Django's ASGI handler with settings.API_MIDDLEWARE in place of settings.MIDDLEWARE,
    and each request's synchronous work on a kept thread (ThreadLanes)."""

    def __init__(self, threads: int = API_THREADS):
        super().__init__()
        self.lanes = ThreadLanes(threads)

    def load_middleware(self, is_async: bool = False) -> None:
        load_api_middleware(self, is_async)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        lane = self.lanes.take()
        if lane is None:
            # Every lane is busy: a thread of its own, as Django gives every request.
            await super().__call__(scope, receive, send)
            return
        try:
            # The outermost context decides the thread; the one Django's
            # handler enters inside this changes nothing. An executor given
            # to the context is the caller's, so leaving does not stop it.
            async with ThreadSensitiveContext(executor=lane):
                await super().__call__(scope, receive, send)
        finally:
            # A call cancelled with its client may still be running on the
            # lane; the next request's calls then queue behind it, one at a
            # time as ever.
            self.lanes.give_back(lane)
