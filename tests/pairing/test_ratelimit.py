import threading
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.core.cache import cache
from django.test import Client

from archipelag import ratelimit
from archipelag.ratelimit import Limit
from islands.models import Island
from pairing import limits

# 10:00 UTC starts a 15-minute and an hourly window, 14 hours before the
# daily window ends, which makes every wait easy to state.
START = datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC)


def fail(client, n=1, ip="192.0.2.10"):
    responses = [client.post("/pair", {"code": "ZZZZZZ"}, REMOTE_ADDR=ip) for _ in range(n)]
    return responses[-1]


def test_five_failures_in_fifteen_minutes_lock_the_account_even_for_the_right_code(
    alice, alice_client, issue_code
):
    with time_machine.travel(START, tick=False):
        issued = issue_code()
        for _ in range(5):
            assert fail(alice_client).status_code == 422
        limited = alice_client.post("/pair", {"code": issued.code}, REMOTE_ADDR="192.0.2.10")
        assert limited.status_code == 429
        assert limited["Retry-After"] == "900"
        assert "Too many wrong codes from this account. Try again in 15 minutes." in limited.content.decode()
        confirm = alice_client.post("/pair/confirm", {"code": issued.code}, REMOTE_ADDR="192.0.2.10")
        assert confirm.status_code == 429
        assert Island.objects.count() == 0
    with time_machine.travel(START + timedelta(minutes=9, seconds=30), tick=False):
        assert alice_client.post("/pair", {"code": issued.code})["Retry-After"] == "330"
    with time_machine.travel(START + timedelta(minutes=15), tick=False):
        issued = issue_code()
        assert alice_client.post("/pair/confirm", {"code": issued.code}).status_code == 302
    assert Island.objects.get().owner == alice


def test_the_limit_is_per_account(alice_client, bob_client, db):
    with time_machine.travel(START, tick=False):
        fail(alice_client, 5, ip="192.0.2.10")
        assert fail(alice_client, ip="192.0.2.10").status_code == 429
        assert fail(bob_client, ip="192.0.2.11").status_code == 422


def test_twenty_failures_a_day_lock_the_account_until_midnight(alice_client, db):
    for quarter in range(4):
        with time_machine.travel(START + timedelta(minutes=15 * quarter), tick=False):
            assert fail(alice_client, 5).status_code == 422
    with time_machine.travel(START + timedelta(hours=1), tick=False):
        limited = fail(alice_client)
        assert limited.status_code == 429
        assert limited["Retry-After"] == str(13 * 3600)
        assert "Try again in 13 hours" in limited.content.decode()


def test_thirty_failures_an_hour_lock_an_address_for_every_account(django_user_model, db):
    clients = []
    for n in range(7):
        client = Client()
        client.force_login(django_user_model.objects.create_user(f"user{n}"))
        clients.append(client)
    with time_machine.travel(START, tick=False):
        for client in clients[:6]:
            assert fail(client, 5, ip="198.51.100.9").status_code == 422
        limited = fail(clients[6], ip="198.51.100.9")
        assert limited.status_code == 429
        assert limited["Retry-After"] == "3600"
        assert fail(clients[6], ip="198.51.100.10").status_code == 422


def test_failures_are_limited_per_network(alice_client, bob_client, monkeypatch, db):
    monkeypatch.setattr(limits, "REDEEM_PER_NETWORK", (Limit("redeem-net-hour", 3, 3600, "your network"),))
    with time_machine.travel(START, tick=False):
        fail(alice_client, 2, ip="192.0.2.1")
        fail(bob_client, 1, ip="192.0.2.2")
        limited = fail(bob_client, ip="192.0.2.3")
        assert limited.status_code == 429
        assert limited["Retry-After"] == "3600"
        assert "Too many wrong codes from your network. Try again in 60 minutes." in limited.content.decode()
        assert fail(bob_client, ip="198.51.100.3").status_code == 422


def test_networks_are_a_24_or_a_56():
    assert ratelimit.network_of("192.0.2.77") == "192.0.2.0/24"
    assert ratelimit.network_of("::ffff:192.0.2.77") == "192.0.2.0/24"
    assert ratelimit.network_of("2001:db8:1:2ff:aaaa::1") == "2001:db8:1:200::/56"
    assert ratelimit.network_of("not an address") == "not an address"


def test_successful_redemptions_are_not_counted(alice_client, issue_code):
    with time_machine.travel(START, tick=False):
        for n in range(6):
            issued = issue_code(host_id=f"host-good-{n:04d}")
            assert alice_client.post("/pair/confirm", {"code": issued.code}).status_code == 302
    assert Island.objects.count() == 6


def test_x_forwarded_for_is_ignored_without_trusted_proxies(alice_client, bob_client, db):
    with time_machine.travel(START, tick=False):
        for client in (alice_client, bob_client):
            for n in range(5):
                client.post(
                    "/pair", {"code": "ZZZZZZ"}, REMOTE_ADDR="192.0.2.50", HTTP_X_FORWARDED_FOR=f"10.0.0.{n}"
                )
        # Both accounts' failures counted against the one real address.
        assert cache.get(f"rl:redeem-ip-hour:192.0.2.50:{int(START.timestamp() // 3600)}") == 10


def test_x_forwarded_for_is_used_behind_a_configured_proxy(alice_client, settings, db):
    settings.NUM_PROXIES = 1
    with time_machine.travel(START, tick=False):
        alice_client.post(
            "/pair", {"code": "ZZZZZZ"}, REMOTE_ADDR="10.0.0.1", HTTP_X_FORWARDED_FOR="1.2.3.4, 203.0.113.9"
        )
        assert cache.get(f"rl:redeem-ip-hour:203.0.113.9:{int(START.timestamp() // 3600)}") == 1


def _concurrent_attempts(buckets, n, refund_passed=False):
    """n threads released at once, each making one attempt; how many were let through."""
    barrier = threading.Barrier(n)
    passed = []

    def worker():
        barrier.wait()
        try:
            counted = ratelimit.attempt(buckets, START)
        except ratelimit.RateLimited:
            return
        passed.append(counted)
        if refund_passed:
            ratelimit.refund(counted)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(passed)


def _hour_key(name, ident):
    return f"rl:{name}:{ident}:{int(START.timestamp() // 3600)}"


def test_a_thousand_concurrent_attempts_pass_exactly_the_limit_in_local_memory(db):
    buckets = limits.mobile_redeem_buckets(ip="192.0.2.77", by_code=True)
    assert _concurrent_attempts(buckets, 1000) == 30
    assert cache.get(_hour_key("mobile-redeem-ip-hour", "192.0.2.77")) == 30


def test_a_thousand_concurrent_attempts_pass_exactly_the_limit_on_redis(redis_url):
    """Many processes share Redis: the increment that decides is one atomic script."""
    # Threads of one process would pass through the per-process lock of the
    # fallback too; on Redis the script must be what counts.
    assert ratelimit._redis_client() is not None
    buckets = limits.mobile_redeem_buckets(ip="192.0.2.78", by_code=True)
    assert _concurrent_attempts(buckets, 1000) == 30
    assert cache.get(_hour_key("mobile-redeem-ip-hour", "192.0.2.78")) == 30
    with pytest.raises(ratelimit.RateLimited):
        ratelimit.attempt(buckets, START)


@pytest.mark.parametrize("backend", ["locmem", "redis"])
def test_refunded_attempts_do_not_use_up_the_limit(backend, request, db):
    if backend == "redis":
        request.getfixturevalue("redis_url")
    buckets = limits.redeem_buckets(ip="192.0.2.79", user_id=1)
    # Every attempt succeeds and is refunded, so none is refused for the limit's sake
    # once the burst is over: the counters are back at zero.
    _concurrent_attempts(buckets, 200, refund_passed=True)
    assert cache.get(_hour_key("redeem-ip-hour", "192.0.2.79")) == 0
    assert _concurrent_attempts(buckets, 5) == 5


@pytest.mark.parametrize("backend", ["locmem", "redis"])
def test_every_limit_lets_exactly_its_number_through_a_burst(backend, request, db):
    if backend == "redis":
        request.getfixturevalue("redis_url")
    cases = [
        (limits.redeem_buckets(ip="192.0.2.80", user_id=7), 5),
        (limits.issue_buckets(ip="192.0.2.81"), limits.ISSUE_PER_IP[0].max_hits),
        (limits.nats_issue_buckets(host_id="host-burst-0001"), limits.ISSUE_PER_HOST[0].max_hits),
        (limits.mobile_open_buckets(user_id=8), limits.MOBILE_OPEN_PER_ACCOUNT[0].max_hits),
    ]
    for buckets, expected in cases:
        assert _concurrent_attempts(buckets, 500) == expected


def test_wait_words():
    assert ratelimit.wait_words(1) == "1 second"
    assert ratelimit.wait_words(59) == "59 seconds"
    assert ratelimit.wait_words(60) == "1 minute"
    assert ratelimit.wait_words(61) == "2 minutes"
    assert ratelimit.wait_words(7200) == "2 hours"
