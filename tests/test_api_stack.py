"""Requests under /api/ run the API's own short middleware; pages keep the browser stack.

Both paths into the code are held to it: daphne's (asgi.py, driven here
with Channels' HttpCommunicator) and the test client's, which tests/conftest.py
routes the same way, so every API test runs what daphne runs.
"""

from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.testing import HttpCommunicator
from django.test import Client, override_settings

from archipelag import asgi
from archipelag.handlers import ApiASGIHandler
from archipelag.middleware import ApiMiddleware


def asgi_request(
    path: str, method: str = "GET", headers: list[tuple[bytes, bytes]] | None = None
) -> dict[str, Any]:
    communicator = HttpCommunicator(
        asgi.application, method, path, body=b"{}", headers=headers or [(b"host", b"127.0.0.1")]
    )
    response: dict[str, Any] = async_to_sync(communicator.get_response)()
    return response


def header(response: dict[str, Any], name: bytes) -> str | None:
    values = [value.decode() for key, value in response["headers"] if key.lower() == name]
    return values[0] if values else None


def test_asgi_sends_api_requests_to_the_lean_handler_and_pages_to_the_full_one():
    router = asgi.application.application_mapping["http"]
    assert router.api is asgi.api_asgi_app
    assert isinstance(router.api, ApiASGIHandler)
    assert router.pages is asgi.django_asgi_app
    assert not isinstance(router.pages, ApiASGIHandler)


def test_an_api_answer_through_asgi_carries_the_security_headers():
    response = asgi_request("/api/v1/ping")
    assert response["status"] == 200
    assert response["body"] == b'{"success": true}'
    assert header(response, b"x-content-type-options") == "nosniff"
    assert header(response, b"x-frame-options") == "DENY"
    assert header(response, b"referrer-policy") == "same-origin"
    assert header(response, b"content-length") == str(len(response["body"]))


def test_an_api_request_for_another_host_is_a_json_400_through_asgi(settings):
    settings.DEBUG = False
    response = asgi_request("/api/v1/ping", headers=[(b"host", b"evil.example.com")])
    assert response["status"] == 400
    assert response["body"].startswith(b'{"success": false, "error": "bad request')


def test_an_unknown_api_path_through_asgi_is_a_json_404(db):
    response = asgi_request("/api/v1/nothing-here")
    assert response["status"] == 404
    assert response["body"] == b'{"success": false, "error": "no such endpoint: see docs/api.md"}'


def test_a_page_for_another_host_keeps_djangos_page(settings):
    settings.DEBUG = False
    response = asgi_request("/", headers=[(b"host", b"evil.example.com")])
    assert response["status"] == 400
    assert header(response, b"content-type").startswith("text/html")


@pytest.mark.parametrize("path", ["/api/v1/ping", "/api/v1/islands/heartbeat"])
def test_production_redirects_plain_http_api_requests_to_https(path):
    # SecurityMiddleware reads its settings when the chain is built.
    with override_settings(SECURE_SSL_REDIRECT=True):
        handler = ApiASGIHandler()
    communicator = HttpCommunicator(handler, "POST", path, body=b"{}", headers=[(b"host", b"127.0.0.1")])
    response = async_to_sync(communicator.get_response)()
    assert response["status"] == 301
    assert header(response, b"location") == f"https://127.0.0.1{path}"


def test_production_sends_hsts_on_https_api_answers():
    with override_settings(SECURE_HSTS_SECONDS=31536000, SECURE_HSTS_INCLUDE_SUBDOMAINS=True):
        handler = ApiASGIHandler()
    communicator = HttpCommunicator(handler, "GET", "/api/v1/ping", headers=[(b"host", b"127.0.0.1")])
    communicator.scope["scheme"] = "https"
    response = async_to_sync(communicator.get_response)()
    assert response["status"] == 200
    assert header(response, b"strict-transport-security") == "max-age=31536000; includeSubDomains"


def test_the_test_client_runs_the_lean_chain_for_the_api_and_the_full_one_for_pages(db):
    client = Client()
    api = client.get("/api/v1/ping")
    # Sessions, auth and htmx set these on the request; the API's chain runs none of them.
    assert not hasattr(api.wsgi_request, "session")
    assert not hasattr(api.wsgi_request, "user")
    assert not hasattr(api.wsgi_request, "htmx")
    assert api["X-Frame-Options"] == "DENY"
    page = client.get("/")
    assert hasattr(page.wsgi_request, "session")
    assert hasattr(page.wsgi_request, "user")


def test_the_api_chain_is_only_what_settings_list(settings):
    assert settings.API_MIDDLEWARE == ["archipelag.middleware.ApiMiddleware"]
    chain: Any = asgi.api_asgi_app._middleware_chain  # type: ignore[attr-defined]
    assert isinstance(chain.__wrapped__, ApiMiddleware)


def _threads_of_request_started(run: Any) -> list[str]:
    """The threads request_started ran on (Django runs its receivers on the request's own thread)."""
    import threading

    from django.core.signals import request_started

    seen: list[str] = []

    def record(**kwargs: Any) -> None:
        seen.append(threading.current_thread().name)

    request_started.connect(record)
    try:
        run()
    finally:
        request_started.disconnect(record)
    return seen


def test_api_requests_run_their_sync_work_on_kept_threads_and_pages_on_fresh_ones():
    def three_of(path: str) -> None:
        for _ in range(3):
            assert asgi_request(path)["status"] in (200, 302)

    api = _threads_of_request_started(lambda: three_of("/api/v1/ping"))
    assert len(api) == 3
    # One kept thread, lent to each request in turn: no thread started per request.
    assert len(set(api)) == 1
    assert api[0].startswith("api-lane-")
    pages = _threads_of_request_started(lambda: three_of("/"))
    assert len(pages) == 3
    assert not any(name.startswith("api-lane-") for name in pages)


def _threads_of_two_at_once(app: Any) -> list[str]:
    """The threads two concurrent pings to `app` ran request_started on.

    Each request's request_started waits for the other's, so both must be on
    threads of their own at once: two sharing one thread, or one waiting for
    the other's thread, would never both arrive, and the barrier would break.
    """
    import asyncio
    import threading

    from django.core.signals import request_started

    barrier = threading.Barrier(2, timeout=5)

    async def both() -> list[dict[str, Any]]:
        communicators = [
            HttpCommunicator(app, "GET", "/api/v1/ping", headers=[(b"host", b"127.0.0.1")]) for _ in range(2)
        ]
        responses: list[dict[str, Any]] = await asyncio.gather(
            *(c.get_response(timeout=10) for c in communicators)
        )
        return responses

    def run() -> None:
        responses = async_to_sync(both)()
        assert [response["status"] for response in responses] == [200, 200]

    def wait_for_the_other(**kwargs: Any) -> None:
        barrier.wait()

    request_started.connect(wait_for_the_other)
    try:
        return _threads_of_request_started(run)
    finally:
        request_started.disconnect(wait_for_the_other)


def test_concurrent_api_requests_each_get_a_lane_of_their_own():
    threads = _threads_of_two_at_once(asgi.application)
    assert len(set(threads)) == 2
    assert all(name.startswith("api-lane-") for name in threads)


def test_with_every_lane_busy_a_request_gets_a_thread_of_its_own():
    threads = _threads_of_two_at_once(ApiASGIHandler(threads=1))
    assert len(set(threads)) == 2
    # One on the only lane, the other on a thread of its own, as Django gives.
    assert sorted(name.startswith("api-lane-") for name in threads) == [False, True]
