import json
from datetime import timedelta

import pytest
import time_machine
from django.core.cache import cache
from django.utils import timezone

from islands.models import Island
from pairing.codes import hash_code
from pairing.models import PairingCode
from tests.conftest import CAPABILITIES, HOST_ID

PAIRING = "/api/v1/islands/pairing"
POLL = "/api/v1/islands/pairing/poll"


def post(client, url, payload, **extra):
    body = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    return client.post(url, body, content_type="application/json", **extra)


@pytest.fixture
def api(client):
    return client


def request_code(api, host_id=HOST_ID, device_secret=None, **extra):
    payload = {"host_id": host_id, "capabilities": CAPABILITIES, "version": "0.5.0"}
    if device_secret is not None:
        payload["device_secret"] = device_secret
    response = post(api, PAIRING, payload, **extra)
    assert response.status_code == 201, response.json()
    return response.json()


# --- Asking for a code ---------------------------------------------------------


def test_an_island_gets_a_code_with_everything_it_needs(api, settings, db):
    settings.PUBLIC_URL = "https://islands.example.org"
    body = request_code(api)
    assert body["success"] is True
    assert len(body["code"]) == 6
    assert body["expires_in_seconds"] == 600
    assert body["pair_url"] == "https://islands.example.org/pair"
    assert len(body["device_secret"]) >= 22  # at least 128 bits
    assert body["poll_interval_seconds"] == 5
    row = PairingCode.objects.get()
    assert row.host_id == HOST_ID
    assert row.capabilities == CAPABILITIES
    assert row.agent_version == "0.5.0"
    assert row.requested_ip == "127.0.0.1"
    assert row.code_hash == hash_code(body["code"])


def test_capabilities_and_version_are_optional_and_may_be_null(api, db):
    for payload in [
        {"host_id": "host-0001-minimal"},
        {"host_id": "host-0002-nulls", "capabilities": None, "version": None},
        {
            "host_id": "host-0003-nullcaps",
            "capabilities": {
                "gpu_model": None,
                "gpu_vram_mb": None,
                "cpu_cores": 8,
                "ram_mb": 16384,
                "region": None,
            },
        },
    ]:
        response = post(api, PAIRING, payload)
        assert response.status_code == 201, response.json()
    assert PairingCode.objects.get(host_id="host-0003-nullcaps").capabilities == {
        "cpu_cores": 8,
        "ram_mb": 16384,
    }


def test_unknown_fields_are_ignored(api, db):
    response = post(api, PAIRING, {"host_id": HOST_ID, "name": "my box", "capabilities": {"npu": "yes"}})
    assert response.status_code == 201


def test_a_host_already_linked_gets_already_paired(api, alice):
    Island.objects.create(owner=alice, host_id=HOST_ID)
    response = post(api, PAIRING, {"host_id": HOST_ID})
    assert response.status_code == 409
    assert response.json() == {"success": False, "error": "already paired"}
    assert PairingCode.objects.count() == 0


def test_a_request_with_the_earlier_device_secret_replaces_that_code(api, db):
    first = request_code(api)
    second = request_code(api, device_secret=first["device_secret"])
    assert first["code"] != second["code"]
    now = timezone.now()
    assert PairingCode.objects.find(first["code"]).state(now) == "retired"
    assert PairingCode.objects.find(second["code"]).state(now) == "live"


def test_a_request_for_a_host_id_leaves_another_requesters_code_live(api, alice):
    """Someone else asks for the owner's host id: the owner's code still links the host, to them."""
    owners = request_code(api, REMOTE_ADDR="198.51.100.7")
    strangers = request_code(api, REMOTE_ADDR="203.0.113.66")
    # A wrong or unmatched device_secret proves nothing, and replaces nothing.
    request_code(api, device_secret="not-the-owners-secret", REMOTE_ADDR="203.0.113.66")
    now = timezone.now()
    assert PairingCode.objects.find(owners["code"]).state(now) == "live"
    assert poll(api, owners).json()["status"] == "pending"

    island = PairingCode.objects.lookup(owners["code"]).redeem(alice)

    with time_machine.travel(now + timedelta(seconds=6)):
        answer = poll(api, owners).json()
        assert answer["status"] == "paired" and answer["island_id"] == str(island.pk)
        # Redeeming one code retires the host's others: the stranger's links nothing.
        assert PairingCode.objects.find(strangers["code"]).state(timezone.now()) == "retired"
        assert poll(api, strangers).json() == {"status": "expired"}
    assert not PairingCode.objects.unused().filter(host_id=HOST_ID).exists()


def test_what_squatting_a_known_host_id_still_allows(api, alice, bob):
    """A stranger who knows the host id and links it first has it; the owner hears so (docs/security.md)."""
    owners = request_code(api, REMOTE_ADDR="198.51.100.7")
    strangers = request_code(api, REMOTE_ADDR="203.0.113.66")
    PairingCode.objects.lookup(strangers["code"]).redeem(bob)
    assert poll(api, owners).json() == {"status": "expired"}
    response = post(api, PAIRING, {"host_id": HOST_ID}, REMOTE_ADDR="198.51.100.7")
    assert response.status_code == 409
    assert Island.objects.get(host_id=HOST_ID).owner == bob


@pytest.mark.parametrize(
    ("body", "status", "error_part"),
    [
        (b"", 400, "body is empty"),
        (b"not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "Expected `object`"),
        (b'{"capabilities": {}}', 400, "missing required field `host_id`"),
        (b'{"host_id": 12345678}', 400, "invalid host_id"),
        (b'{"host_id": "short"}', 400, "invalid host_id"),
        (b'{"host_id": "' + b"a" * 65 + b'"}', 400, "invalid host_id"),
        (b'{"host_id": "has spaces in it"}', 400, "invalid host_id"),
        (b'{"host_id": "host/../../etc"}', 400, "invalid host_id"),
        (b'{"host_id": "ok-host-id", "capabilities": "big"}', 400, "invalid capabilities"),
        (
            b'{"host_id": "ok-host-id", "capabilities": {"cpu_cores": "16"}}',
            400,
            "invalid capabilities.cpu_cores",
        ),
        (
            b'{"host_id": "ok-host-id", "capabilities": {"cpu_cores": true}}',
            400,
            "invalid capabilities.cpu_cores",
        ),
        (b'{"host_id": "ok-host-id", "capabilities": {"ram_mb": -1}}', 400, "invalid capabilities.ram_mb"),
        (b'{"host_id": "ok-host-id", "capabilities": {"ram_mb": 1e400}}', 400, "capabilities.ram_mb"),
        (
            b'{"host_id": "ok-host-id", "capabilities": {"gpu_vram_mb": 99999999999999999999}}',
            400,
            "gpu_vram_mb",
        ),
        (b'{"host_id": "ok-host-id", "version": "' + b"9" * 65 + b'"}', 400, "invalid version"),
        (b'{"host_id": "ok-host-id", "version": "0.5\\u0000"}', 400, "invalid version"),
        (
            b'{"host_id": "ok-host-id", "capabilities": {"gpu_model": "RTX\\u0000"}}',
            400,
            "invalid capabilities.gpu_model: Expected `str` without NUL characters",
        ),
        (b'{"host_id": "ok-host-id", "padding": "' + b"x" * 20000 + b'"}', 413, "body too large"),
    ],
)
def test_malformed_pairing_requests_are_refused_and_write_nothing(api, db, body, status, error_part):
    response = api.post(PAIRING, body, content_type="application/json")
    assert response.status_code == status
    assert response.json()["success"] is False
    assert error_part in response.json()["error"]
    assert PairingCode.objects.count() == 0


def test_only_post_is_allowed(api, db):
    response = api.get(PAIRING)
    assert response.status_code == 405
    assert response.json() == {"success": False, "error": "method not allowed: use POST"}


def test_the_api_needs_no_csrf_token(db):
    from django.test import Client

    strict = Client(enforce_csrf_checks=True)
    assert post(strict, PAIRING, {"host_id": HOST_ID}).status_code == 201


# --- Polling -------------------------------------------------------------------


def poll(api, body, secret=None):
    return post(api, POLL, {"host_id": HOST_ID, "device_secret": secret or body["device_secret"]})


def test_poll_is_pending_until_a_user_links_the_island(api, db):
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        body = request_code(api)
    with time_machine.travel(start + timedelta(seconds=100), tick=False):
        response = poll(api, body)
    assert response.status_code == 200
    assert response.json() == {"status": "pending", "expires_in_seconds": 500}


def test_poll_hands_out_the_token_exactly_once_and_stores_only_its_hash(api, alice):
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        body = request_code(api)
        island = PairingCode.objects.find(body["code"]).redeem(alice)
    with time_machine.travel(start + timedelta(seconds=6), tick=False):
        answer = poll(api, body).json()
    assert answer["status"] == "paired"
    assert answer["island_id"] == str(island.pk)
    token = answer["token"]
    island.refresh_from_db()
    assert island.token_hash is not None and token not in island.token_hash
    assert Island.objects.authenticate(token) == island

    with time_machine.travel(start + timedelta(seconds=12), tick=False):
        again = poll(api, body)
    assert again.status_code == 410
    assert "already handed out" in again.json()["error"]
    assert "token" not in again.json()
    island.refresh_from_db()
    assert Island.objects.authenticate(token) == island  # the first token still works


def test_a_poll_after_the_token_was_handed_out_is_410_and_writes_nothing(api, alice):
    """Found by tests/fuzz: the 410 used to record the poll's time first."""
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        body = request_code(api)
        PairingCode.objects.find(body["code"]).redeem(alice)
        assert poll(api, body).json()["status"] == "paired"
    row = PairingCode.objects.get()
    with time_machine.travel(start + timedelta(seconds=30), tick=False):
        assert poll(api, body).status_code == 410
    assert PairingCode.objects.get().last_polled_at == row.last_polled_at == start


def test_poll_says_expired_after_ten_minutes(api, db):
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        body = request_code(api)
    with time_machine.travel(start + timedelta(seconds=600), tick=False):
        assert poll(api, body).json() == {"status": "expired"}


def test_poll_of_a_replaced_code_says_expired(api, db):
    first = request_code(api)
    request_code(api, device_secret=first["device_secret"])
    assert poll(api, first).json() == {"status": "expired"}


def test_poll_with_a_wrong_secret_is_401(api, db):
    body = request_code(api)
    response = poll(api, body, secret="not-the-secret")
    assert response.status_code == 401
    assert response.json()["success"] is False
    response = post(api, POLL, {"host_id": "unknown-host-1", "device_secret": body["device_secret"]})
    assert response.status_code == 401


def test_polling_faster_than_the_interval_is_told_to_slow_down(api, db):
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        body = request_code(api)
        assert poll(api, body).status_code == 200
    with time_machine.travel(start + timedelta(seconds=3), tick=False):
        response = poll(api, body)
        assert response.status_code == 429
        assert response.json() == {"success": False, "error": "slow_down"}
        assert response["Retry-After"] == "5"
    with time_machine.travel(start + timedelta(seconds=5), tick=False):
        assert poll(api, body).status_code == 200


@pytest.mark.parametrize(
    "body",
    [b"{}", b'{"host_id": "550e8400-e29b-41d4"}', b'{"host_id": 1, "device_secret": "x"}', b"nope"],
)
def test_malformed_polls_are_400(api, db, body):
    response = api.post(POLL, body, content_type="application/json")
    assert response.status_code == 400
    assert response.json()["success"] is False


# --- Rate limit on issuing -------------------------------------------------------


def test_code_issuance_is_limited_per_address(api, db):
    start = timezone.now().replace(minute=0, second=0, microsecond=0)
    with time_machine.travel(start, tick=False):
        for n in range(60):
            request_code(api, host_id=f"host-{n:04d}-limit")
        response = post(api, PAIRING, {"host_id": "host-9999-limit"})
    assert response.status_code == 429
    assert response["Retry-After"] == "3600"
    assert "retry in 60 minutes" in response.json()["error"]
    assert PairingCode.objects.filter(host_id="host-9999-limit").count() == 0
    # Another address is not affected.
    assert post(api, PAIRING, {"host_id": "host-9999-limit"}, REMOTE_ADDR="198.51.100.1").status_code == 201


def test_a_linked_host_hears_already_paired_before_any_limit_and_is_not_counted(api, alice):
    """The agent stops asking once told "already paired"; a 429 would keep it asking."""
    Island.objects.create(owner=alice, host_id=HOST_ID)
    start = timezone.now().replace(minute=0, second=0, microsecond=0)
    with time_machine.travel(start, tick=False):
        for n in range(60):
            request_code(api, host_id=f"host-{n:04d}-limit")
        for _ in range(3):
            response = post(api, PAIRING, {"host_id": HOST_ID})
            assert (response.status_code, response.json()["error"]) == (409, "already paired")
        # The linked host's requests took nothing from the address's budget: it is spent, not overspent.
        assert cache.get(f"rl:issue-ip-hour:127.0.0.1:{int(start.timestamp() // 3600)}") == 60
    assert PairingCode.objects.filter(host_id=HOST_ID).count() == 0


# --- Bodies no JSON encoder would produce (found by tests/fuzz) -------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"host_id": "\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8"}',
        b'{"host_id": "ok-host-id", "version": "caf\xe9"}',
        b'{"host_id": "ok-host-id", "caf\xe9": 1}',
    ],
    ids=["in-a-field", "latin-1-text", "in-an-unknown-key"],
)
def test_a_body_that_is_not_utf8_is_400_not_500(api, db, body):
    response = api.post(PAIRING, body, content_type="application/json")
    assert response.status_code == 400
    assert response.json() == {"success": False, "error": "body is not valid JSON: it is not UTF-8"}
    assert PairingCode.objects.count() == 0


def test_a_host_id_with_a_trailing_newline_is_refused(api, db):
    response = post(api, PAIRING, {"host_id": HOST_ID + "\n"})
    assert response.status_code == 400
    assert response.json()["error"].startswith("invalid host_id")
    assert PairingCode.objects.count() == 0
