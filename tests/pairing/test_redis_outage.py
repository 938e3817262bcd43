"""Pairing while Redis is unreachable or hangs.

The rate-limit counters live in the shared cache. Here the cache is a real
Redis client pointed at a port where nothing listens, as when Redis is
restarting, so these run on every machine. The policy (archipelag/ratelimit.py):
what bounds the odds of guessing a code (typed codes, issuing codes) waits
with a 503; what does not (scanned 256-bit secrets, opening a session) goes
ahead uncounted. The live event to the page is best-effort and bounded in
time. tests/faults/test_redis_down.py stops and freezes a real Redis under
daphne and a real browser.
"""

import asyncio
import logging
import time

import msgspec
import pytest
from channels.layers import get_channel_layer
from redis.exceptions import ResponseError

from archipelag import nats as bridge
from archipelag import ratelimit
from islands.agent import HostRegistration
from islands.models import Island
from pairing.models import MobilePairingSession, PairingCode
from tests.conftest import HOST_ID, _free_port
from tests.pairing.conftest import pair_phone

UNAVAILABLE = "pairing by typed code is unavailable for a moment; scan the QR code, or retry in 30 seconds"


@pytest.fixture
def redis_down(settings, caplog):
    """The cache is Redis, and Redis does not answer."""
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{_free_port()}/0",
        }
    }
    caplog.set_level(logging.INFO)
    return caplog


def refuse_writes(*args, **kwargs):
    raise ResponseError("OOM command not allowed when used memory > 'maxmemory'.")


def assert_unavailable(response, error):
    assert response.status_code == 503
    assert response["Retry-After"] == "30"
    assert response.json() == {"success": False, "error": error}


def test_a_scanned_qr_code_pairs_uncounted(client, alice, open_session, redis_down):
    opened = open_session(alice)
    response = pair_phone(client, secret=opened.secret)
    assert response.status_code == 201, response.json()
    assert Island.objects.get().owner == alice
    assert MobilePairingSession.objects.get(pk=opened.row.pk).used_at is not None
    assert "event=rate_limit_unavailable policy=open limits=mobile-redeem-ip-hour" in redis_down.text


def test_a_wrong_qr_secret_is_still_refused(client, alice, open_session, redis_down):
    open_session(alice)
    response = pair_phone(client, secret="x" * 43)
    assert response.status_code == 401
    assert response.json() == {"success": False, "error": "unknown or already used QR code"}


def test_a_typed_mobile_code_waits_with_a_503_and_writes_nothing(client, alice, open_session, redis_down):
    opened = open_session(alice)
    # The right code, even: without its counters no typed code is looked at.
    assert_unavailable(pair_phone(client, code=opened.code), UNAVAILABLE)
    assert Island.objects.count() == 0
    assert MobilePairingSession.objects.get(pk=opened.row.pk).used_at is None
    assert "event=rate_limit_unavailable policy=closed" in redis_down.text


def test_a_typed_code_that_cannot_be_counted_gets_a_503(client, alice, open_session, monkeypatch):
    """Redis out of memory answers reads but refuses writes: no guess may pass uncounted.

    Counting comes first, so the right code waits too: until the attempt is
    counted, nobody knows whether it is a guess.
    """
    opened = open_session(alice)
    monkeypatch.setattr(ratelimit, "_count", refuse_writes)
    assert_unavailable(pair_phone(client, code="ZZZZZZ"), UNAVAILABLE)
    assert_unavailable(pair_phone(client, code=opened.code), UNAVAILABLE)
    monkeypatch.undo()
    assert pair_phone(client, code=opened.code).status_code == 201


def test_the_mobile_page_opens_a_session_uncounted(alice_client, redis_down):
    response = alice_client.get("/pair/mobile")
    assert response.status_code == 200
    assert MobilePairingSession.objects.count() == 1
    assert "policy=open limits=mobile-open-account-hour" in redis_down.text


def test_islands_get_no_code_over_http(client, db, redis_down):
    response = client.post("/api/v1/islands/pairing", {"host_id": HOST_ID}, content_type="application/json")
    assert_unavailable(response, "pairing is unavailable for a moment; retry in 30 seconds")
    assert not PairingCode.objects.exists()


def test_islands_get_no_code_over_nats(db, redis_down):
    request = msgspec.json.decode(b'{"host_id": "%s"}' % HOST_ID.encode(), type=HostRegistration)
    outcome, answer = bridge.request_code(request)
    assert outcome == "unavailable"
    assert answer == {"success": False, "error": "pairing is unavailable for a moment; retry in 30 seconds"}
    assert not PairingCode.objects.exists()


@pytest.fixture
def issued_before(issue_code):
    """A live code, issued while Redis still answered (listed before `redis_down`)."""
    return issue_code()


@pytest.mark.parametrize("url", ["/pair", "/pair/confirm"])
def test_the_pair_page_asks_to_try_again_for_a_typed_code(alice_client, issued_before, redis_down, url):
    issued = issued_before
    response = alice_client.post(url, {"code": issued.code})
    assert response.status_code == 503
    assert response["Retry-After"] == "30"
    assert (
        "Linking Islands is unavailable for a moment. Try again in 30 seconds." in response.content.decode()
    )
    assert Island.objects.count() == 0


def test_a_wrong_desktop_code_that_cannot_be_counted_gets_a_503(alice_client, db, monkeypatch):
    monkeypatch.setattr(ratelimit, "_count", refuse_writes)
    response = alice_client.post("/pair", {"code": "ZZZZZZ"})
    assert response.status_code == 503
    assert "Try again in 30 seconds" in response.content.decode()


def test_a_hanging_channel_layer_holds_up_the_phones_answer_only_briefly(
    client, alice, monkeypatch, transactional_db, caplog
):
    """The live event is sent after the commit, before the answer: it must not wait on a frozen Redis."""

    async def hang(group, message):
        await asyncio.sleep(60)

    monkeypatch.setattr(get_channel_layer(), "group_send", hang)
    monkeypatch.setattr("pairing.models.ANNOUNCE_TIMEOUT", 0.2)
    opened = MobilePairingSession.objects.open(alice)
    started = time.monotonic()
    response = pair_phone(client, secret=opened.secret)
    assert response.status_code == 201
    assert time.monotonic() - started < 10  # not the 60 s the layer would take
    assert Island.objects.get().owner == alice
    assert "TimeoutError" in caplog.text
