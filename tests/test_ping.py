from django.db import connection
from django.test.utils import CaptureQueriesContext


def test_ping_answers_json_without_touching_the_database(client, db):
    with CaptureQueriesContext(connection) as queries:
        response = client.get("/api/v1/ping")
    assert response.status_code == 200
    assert response.json() == {"success": True}
    assert len(queries) == 0


def test_ping_accepts_a_post_body_without_a_csrf_token(db):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    response = client.post("/api/v1/ping", b'{"anything": 1}', content_type="application/json")
    assert response.status_code == 200
    assert response.json() == {"success": True}


def test_ping_refuses_other_methods_in_json(client, db):
    """Found by tests/fuzz: the 405 was Django's empty text/html answer."""
    response = client.put("/api/v1/ping")
    assert response.status_code == 405
    assert response["Allow"] == "GET, POST"
    assert response.json() == {"success": False, "error": "method not allowed: use GET or POST"}
