from channels.layers import get_channel_layer
from django.db import OperationalError
from django.test import Client


def test_healthz_checks_database_and_channel_layer(client, db):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok", "channel_layer": "ok"}


def test_healthz_works_with_the_redis_layer(client, db, redis_url):
    assert type(get_channel_layer()).__name__ == "RedisChannelLayer"
    assert client.get("/healthz").json()["channel_layer"] == "ok"


def test_healthz_reports_a_failing_database_as_503(client, db, monkeypatch):
    def broken_query():
        raise OperationalError("server closed the connection")

    monkeypatch.setattr("archipelag.views._database_ok", broken_query)
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json() == {"status": "failing", "database": "failing", "channel_layer": "ok"}


def test_healthz_reports_a_failing_channel_layer_as_503(client, db, monkeypatch):
    layer = get_channel_layer()

    async def broken_send(channel, message):
        raise ConnectionError("redis is down")

    monkeypatch.setattr(layer, "send", broken_send)
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["channel_layer"] == "failing"
    assert "redis is down" not in response.content.decode()


def test_healthz_answers_get_and_head_only(client, db):
    # Found by schemathesis (tests/test_openapi.py): TRACE ran the checks and answered 200.
    response = client.generic("TRACE", "/healthz")
    assert response.status_code == 405
    assert response["Allow"] == "GET, HEAD"
    assert response.json() == {"success": False, "error": "method not allowed: use GET"}
    assert client.head("/healthz").status_code == 200
    assert Client(enforce_csrf_checks=True).post("/healthz").status_code == 405
