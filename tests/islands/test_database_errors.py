"""A JSON endpoint whose database drops mid-request answers 503 in JSON, not an HTML 500.

tests/faults/test_postgres_drop.py drops real connections under daphne;
here the ORM raises what psycopg raises then.
"""

import logging

from django.db import IntegrityError, OperationalError

from islands import views as island_views
from islands.groupcommit import GroupCommitFailed
from islands.models import Island
from pairing.models import MobilePairingSession
from tests.islands.conftest import MINIMAL_HEARTBEAT, post_json
from tests.pairing.conftest import pair_phone

UNAVAILABLE = {"success": False, "error": "the coordinator cannot reach its database; retry in 5 seconds"}


def dropped(*args, **kwargs):
    raise OperationalError("consuming input failed: server closed the connection unexpectedly")


def test_a_heartbeat_whose_connection_drops_gets_a_json_503(client, token, monkeypatch, caplog):
    monkeypatch.setattr(Island.objects, "record_heartbeats", dropped)
    with caplog.at_level(logging.ERROR):
        response = post_json(client, "/api/v1/islands/heartbeat", MINIMAL_HEARTBEAT, token)
    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    assert response.json() == UNAVAILABLE
    assert "event=database_unavailable path=/api/v1/islands/heartbeat" in caplog.text
    assert "server closed the connection" not in response.content.decode()


def test_a_heartbeat_riding_in_a_failed_batch_gets_the_same_503(client, token, monkeypatch):
    async def follower_of_a_failed_batch(item):
        raise GroupCommitFailed("the batch holding this item failed") from OperationalError("gone")

    monkeypatch.setattr(island_views.heartbeat_commits, "asubmit", follower_of_a_failed_batch)
    response = post_json(client, "/api/v1/islands/heartbeat", MINIMAL_HEARTBEAT, token)
    assert (response.status_code, response.json()) == (503, UNAVAILABLE)


def test_a_mobile_pairing_whose_connection_drops_gets_a_json_503(client, alice, monkeypatch):
    opened = MobilePairingSession.objects.open(alice)
    monkeypatch.setattr(MobilePairingSession, "redeem", dropped)
    response = pair_phone(client, secret=opened.secret)
    assert (response.status_code, response.json()) == (503, UNAVAILABLE)


def test_other_database_errors_stay_server_errors(client, token, monkeypatch):
    """An integrity error is a bug, not an outage: it is not dressed up as "retry"."""

    def broken(*args, **kwargs):
        raise IntegrityError("duplicate key")

    monkeypatch.setattr(Island.objects, "record_heartbeats", broken)
    client.raise_request_exception = False
    response = post_json(client, "/api/v1/islands/heartbeat", MINIMAL_HEARTBEAT, token)
    assert response.status_code == 500
