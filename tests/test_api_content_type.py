"""The JSON endpoints that read a body take it only as application/json (415 otherwise).

A page on another site can make a visitor's browser POST text/plain, a
form or multipart anywhere without a CORS preflight, and so spend the
visitor's address on the pairing limits; application/json needs a
preflight, which nothing here answers.
"""

import json

import pytest

from islands.models import DispatcherKey, Island
from pairing.models import PairingCode
from tests.conftest import HOST_ID

BODY = json.dumps({"host_id": HOST_ID})
CROSS_SITE_TYPES = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""]
READS_A_BODY = [
    "/api/v1/islands/pairing",
    "/api/v1/islands/pairing/poll",
    "/api/v1/mobile/pair",
    "/api/v1/islands/heartbeat",
    "/api/v1/islands/jobs/j1/status",
    "/api/v1/jobs",
]


@pytest.mark.parametrize("path", READS_A_BODY)
@pytest.mark.parametrize("content_type", CROSS_SITE_TYPES)
def test_a_body_that_is_not_application_json_is_415_and_writes_nothing(client, alice, path, content_type):
    island = Island.objects.create(owner=alice, host_id=HOST_ID)
    credential = (
        DispatcherKey.objects.issue("dispatcher")[1] if path == "/api/v1/jobs" else island.issue_token()
    )
    headers = {"Authorization": f"Bearer {credential}"}
    response = client.post(path, BODY, content_type=content_type, headers=headers)
    assert response.status_code == 415
    assert response.json() == {
        "success": False,
        "error": "send the body as JSON, with Content-Type: application/json",
    }
    assert PairingCode.objects.count() == 0


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"]
)
def test_application_json_with_or_without_a_charset_is_read(client, db, content_type):
    response = client.post("/api/v1/islands/pairing", BODY, content_type=content_type)
    assert response.status_code == 201


def test_cross_site_posts_do_not_spend_the_addresss_pairing_budget(client, db):
    for _ in range(61):  # one more than the address's 60 codes an hour
        response = client.post("/api/v1/islands/pairing", BODY, content_type="text/plain")
        assert response.status_code == 415
    response = client.post("/api/v1/islands/pairing", BODY, content_type="application/json")
    assert response.status_code == 201


@pytest.mark.parametrize("content_type", CROSS_SITE_TYPES)
def test_ping_and_the_jobs_poll_read_no_body_and_take_any(client, alice, content_type):
    island = Island.objects.create(owner=alice, host_id=HOST_ID)
    headers = {"Authorization": f"Bearer {island.issue_token()}"}
    assert client.post("/api/v1/ping", "x", content_type=content_type).status_code == 200
    response = client.post("/api/v1/islands/jobs/poll", "x", content_type=content_type, headers=headers)
    assert response.status_code == 200
