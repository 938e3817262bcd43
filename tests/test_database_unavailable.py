"""A database out of reach, or a pool with no connection to give, answers 503 with Retry-After.

Issue 14: 30 concurrent logins held every pooled connection while they
hashed, and pages waiting for one answered 500 after the pool's timeout
(PoolTimeout). Pages now answer a short page of the site's own, JSON
endpoints `{"success": false, "error": ...}`; tests/faults/test_login_flood.py
exhausts a real pool under daphne.
"""

from contextlib import contextmanager

from django.contrib.sessions.backends.db import SessionStore
from django.db import OperationalError
from django.db.backends.utils import CursorWrapper
from django.test import Client, RequestFactory

from archipelag.views import server_error
from islands.models import Island
from tests.conftest import PASSWORD

POOL_TIMEOUT = "couldn't get a connection after 10.00 sec"
UNAVAILABLE = {"success": False, "error": "the coordinator cannot reach its database; retry in 5 seconds"}


def no_connection(*args, **kwargs):
    # What Django raises for psycopg_pool.PoolTimeout (an OperationalError).
    raise OperationalError(POOL_TIMEOUT)


@contextmanager
def pool_exhausted(monkeypatch):
    """Every query fails as one waiting for a pooled connection does; only within the block."""
    with monkeypatch.context() as patch:
        patch.setattr(CursorWrapper, "execute", no_connection)
        yield


def assert_busy_page(response):
    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    html = response.content.decode()
    assert "<title>Busy for a moment · Archipelag.io</title>" in html
    assert "Try again in 5 seconds." in html
    assert 'class="brand"' in html
    assert POOL_TIMEOUT not in html
    return html


def test_a_page_whose_database_is_out_of_reach_is_a_503_page(alice_client, monkeypatch):
    with pool_exhausted(monkeypatch):
        html = assert_busy_page(alice_client.get("/settings"))
    # Rendered without the request: nothing on it reads the database.
    assert "Log out" not in html


def test_a_login_whose_database_is_out_of_reach_is_a_503_page(client, alice, monkeypatch):
    with pool_exhausted(monkeypatch):
        assert_busy_page(client.post("/accounts/login/", {"username": "alice", "password": PASSWORD}))


def test_the_admin_whose_database_is_out_of_reach_is_a_503_page(admin_client, monkeypatch):
    with pool_exhausted(monkeypatch):
        assert_busy_page(admin_client.get("/admin/islands/island/"))


def test_an_api_endpoint_whose_database_is_out_of_reach_answers_json(client, alice, monkeypatch):
    token = Island.objects.create(owner=alice, host_id="pool-host-0001").issue_token()
    with pool_exhausted(monkeypatch):
        response = client.post(
            "/api/v1/islands/heartbeat",
            "{}",
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {token}",
        )
    assert (response.status_code, response.json()) == (503, UNAVAILABLE)
    assert response["Retry-After"] == "5"


def test_an_error_raised_outside_the_view_is_answered_the_same_way():
    """handler500: what fails after the view (a session saved on the way out)."""
    for path, json in (("/settings", False), ("/api/v1/islands/heartbeat", True)):
        try:
            raise OperationalError(POOL_TIMEOUT)
        except OperationalError:
            response = server_error(RequestFactory().get(path))
        if json:
            assert (response.status_code, response["Retry-After"]) == (503, "5")
        else:
            assert_busy_page(response)


def test_other_errors_stay_the_sites_500(db, monkeypatch):
    try:
        raise ValueError("a bug")
    except ValueError:
        response = server_error(RequestFactory().get("/settings"))
    assert response.status_code == 500
    assert "Something went wrong" in response.content.decode()


def test_a_session_saved_after_the_view_failing_is_a_503(alice, monkeypatch, settings):
    """SessionMiddleware saves on the way out, after the view: handler500 answers that."""
    settings.SESSION_SAVE_EVERY_REQUEST = True
    client = Client(raise_request_exception=False)
    client.force_login(alice)

    def save_fails(self, must_create=False):
        raise OperationalError(POOL_TIMEOUT)

    monkeypatch.setattr(SessionStore, "save", save_fails)
    assert_busy_page(client.get("/settings"))
