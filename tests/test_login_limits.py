"""Logins counted per account and per address, signups per address and network, hashing in turns.

Issue 14: 150 wrong admin passwords from one address met no delay and no
lockout, and signup was not throttled at all.
"""

import threading
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from html import unescape

import pytest
import time_machine
from django.contrib.auth import check_password_with_timing_attack_mitigation
from django.contrib.auth.models import User
from django.db import connection, connections
from django.test import Client

from archipelag import auth
from tests.conftest import PASSWORD

# 10:00 UTC starts a 15-minute and an hourly window: every wait is easy to state.
START = datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC)
LOGIN = "/accounts/login/"
ADMIN_LOGIN = "/admin/login/"


def log_in(client, username="alice", password="wrong", ip="192.0.2.10", url=LOGIN):  # noqa: S107
    return client.post(url, {"username": username, "password": password}, REMOTE_ADDR=ip)


def page(response):
    return unescape(response.content.decode())


@contextmanager
def hashing_threads_busy():
    """Every hashing thread busy until the block ends: a hash asked for meanwhile waits its turn."""
    release = threading.Event()
    executor, size = auth._hashers()
    for _ in range(size):
        executor.submit(release.wait)
    try:
        yield
    finally:
        release.set()


def signed_in(client):
    return client.get("/settings").status_code == 200


def test_ten_failures_lock_the_account_even_for_the_right_password_from_another_address(client, alice):
    with time_machine.travel(START, tick=False):
        for n in range(10):
            response = log_in(client, ip=f"192.0.2.{n}")
            assert response.status_code == 200
            assert "Please enter a correct username and password" in page(response)
        limited = log_in(client, password=PASSWORD, ip="198.51.100.1")
        assert limited.status_code == 429
        assert limited["Retry-After"] == "900"
        assert "Too many failed logins from this account. Try again in 15 minutes." in page(limited)
        assert not signed_in(client)
    with time_machine.travel(START + timedelta(minutes=15), tick=False):
        assert log_in(client, password=PASSWORD).status_code == 302
        assert signed_in(client)


def test_the_account_limit_counts_names_whatever_their_case(client, alice):
    with time_machine.travel(START, tick=False):
        for n in range(10):
            log_in(client, username="ALICE" if n % 2 else "alice", ip=f"192.0.2.{n}")
        assert log_in(client, password=PASSWORD).status_code == 429


def test_thirty_failures_lock_an_address_for_every_account(client, alice, bob):
    with time_machine.travel(START, tick=False):
        for n in range(30):
            assert log_in(client, username=f"nobody-{n}").status_code == 200
        limited = log_in(client, username="bob", password=PASSWORD)
        assert limited.status_code == 429
        assert limited["Retry-After"] == "3600"
        assert "Too many failed logins from this address. Try again in 60 minutes." in page(limited)
        # Another address is not held back.
        assert log_in(client, username="bob", password=PASSWORD, ip="192.0.2.99").status_code == 302


def test_successful_logins_are_not_counted(alice):
    with time_machine.travel(START, tick=False):
        for _ in range(15):
            client = Client()
            assert log_in(client, password=PASSWORD).status_code == 302
        for _ in range(9):
            log_in(Client())
        assert log_in(Client(), password=PASSWORD).status_code == 302


def test_the_admin_login_is_counted_the_same_way(client, admin_user):
    with time_machine.travel(START, tick=False):
        for _ in range(10):
            response = log_in(client, username="admin", url=ADMIN_LOGIN)
            assert response.status_code == 200
            assert "Please enter the correct username and password for a staff account" in page(response)
        limited = log_in(client, username="admin", password="password", url=ADMIN_LOGIN)
        assert limited.status_code == 429
        assert limited["Retry-After"] == "900"
        assert "Too many failed logins from this account. Try again in 15 minutes." in page(limited)
        assert client.get("/admin/").status_code == 302
    with time_machine.travel(START + timedelta(minutes=15), tick=False):
        assert log_in(client, username="admin", password="password", url=ADMIN_LOGIN).status_code == 302
        assert client.get("/admin/").status_code == 200


@pytest.mark.django_db(transaction=True)
def test_a_burst_of_wrong_passwords_gets_exactly_the_limit_checked(redis_url, postgres):
    """Fifty at once, on PostgreSQL and Redis as in production: ten are checked, forty refused."""
    User.objects.create_user("alice", password=PASSWORD)
    barrier = threading.Barrier(50)
    statuses: list[int] = []

    def attempt(n):
        try:
            barrier.wait()
            statuses.append(log_in(Client(), ip=f"10.{n}.0.1").status_code)
        finally:
            connection.close()

    with time_machine.travel(START, tick=False):
        threads = [threading.Thread(target=attempt, args=(n,)) for n in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(statuses) == [200] * 10 + [429] * 40


def test_no_turn_to_hash_answers_503_with_the_wait_and_counts_nothing(client, alice, settings):
    settings.PASSWORD_HASHING_CONCURRENCY = 1
    settings.PASSWORD_HASHING_WAIT = 0
    with time_machine.travel(START, tick=False), hashing_threads_busy():
        busy = log_in(client, password=PASSWORD)
        assert busy.status_code == 503
        assert busy["Retry-After"] == "1"
        assert "Too many logins are being checked right now. Try again in 1 second." in page(busy)
        for _ in range(10):
            assert log_in(client).status_code == 503
    settings.PASSWORD_HASHING_WAIT = 10
    with time_machine.travel(START, tick=False):
        # The refused tries were taken back: the account's ten are all left.
        for _ in range(10):
            assert log_in(client).status_code == 200
        assert log_in(client).status_code == 429


def test_hashes_run_at_most_the_configured_number_at_once(alice, settings, monkeypatch):
    settings.PASSWORD_HASHING_CONCURRENCY = 2
    settings.PASSWORD_HASHING_WAIT = 30
    running, most = 0, 0
    lock = threading.Lock()
    check = check_password_with_timing_attack_mitigation

    def slow_check(user, password):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        threading.Event().wait(0.05)
        with lock:
            running -= 1
        return check(user, password)

    monkeypatch.setattr(auth, "check_password_with_timing_attack_mitigation", slow_check)
    barrier = threading.Barrier(8)

    def attempt(n):
        barrier.wait()
        auth.PoolFriendlyModelBackend().authenticate(None, username=f"nobody-{n}", password="x")

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most == 2


@pytest.mark.django_db(transaction=True)
def test_the_backend_holds_no_database_connection_while_it_hashes(postgres, monkeypatch):
    if getattr(connection, "pool", None) is None:
        pytest.skip("needs the PostgreSQL connection pool (DATABASE_POOL on, the default)")
    User.objects.create_user("alice", password=PASSWORD)
    held_while_hashing = []
    check = check_password_with_timing_attack_mitigation
    # The request's connection: the test client runs the view in this thread.
    requests_connection = connections["default"]

    def watched_check(user, password):
        held_while_hashing.append(requests_connection.connection is not None)
        return check(user, password)

    monkeypatch.setattr(auth, "check_password_with_timing_attack_mitigation", watched_check)
    client = Client()
    assert log_in(client, password=PASSWORD).status_code == 302
    assert log_in(Client()).status_code == 200
    assert log_in(Client(), username="nobody").status_code == 200
    assert held_while_hashing == [False, False, False]
    assert signed_in(client)


# --- Signup ---------------------------------------------------------------------------------


def sign_up(client, username, ip="192.0.2.10"):
    return client.post(
        "/accounts/signup/",
        {
            "username": username,
            "email": f"{username}@example.com",
            "password1": PASSWORD,
            "password2": PASSWORD,
        },
        REMOTE_ADDR=ip,
    )


def test_five_accounts_an_hour_from_one_address(db):
    with time_machine.travel(START, tick=False):
        for n in range(5):
            assert sign_up(Client(), f"user{n}").status_code == 302
        limited = sign_up(Client(), "user5")
        assert limited.status_code == 429
        assert limited["Retry-After"] == "3600"
        assert "Too many new accounts from this address. Try again in 60 minutes." in page(limited)
        assert not User.objects.filter(username="user5").exists()
        assert sign_up(Client(), "user5", ip="198.51.100.7").status_code == 302
    assert User.objects.count() == 6


def test_twenty_accounts_an_hour_from_one_network(db):
    with time_machine.travel(START, tick=False):
        for n in range(20):
            assert sign_up(Client(), f"user{n}", ip=f"203.0.113.{n}").status_code == 302
        limited = sign_up(Client(), "user20", ip="203.0.113.200")
        assert limited.status_code == 429
        assert "Too many new accounts from your network. Try again in 60 minutes." in page(limited)
        assert sign_up(Client(), "user20", ip="203.0.114.1").status_code == 302
    assert User.objects.count() == 21


def test_a_refused_signup_keeps_what_was_typed_and_is_not_counted_when_invalid(db):
    with time_machine.travel(START, tick=False):
        for n in range(8):
            response = Client().post(
                "/accounts/signup/",
                {"username": f"u{n}", "email": "x@example.com", "password1": "a", "password2": "b"},
                REMOTE_ADDR="192.0.2.10",
            )
            assert response.status_code == 400
        assert sign_up(Client(), "carol").status_code == 302
        for n in range(4):
            sign_up(Client(), f"more{n}")
        limited = sign_up(Client(), "dave")
        assert 'value="dave"' in page(limited)
        assert 'value="dave@example.com"' in page(limited)


def test_no_turn_to_hash_a_new_password_answers_503(db, settings):
    settings.PASSWORD_HASHING_CONCURRENCY = 1
    settings.PASSWORD_HASHING_WAIT = 0
    with hashing_threads_busy():
        busy = sign_up(Client(), "carol")
    assert busy.status_code == 503
    assert busy["Retry-After"] == "1"
    assert "Too many accounts are being made right now. Try again in 1 second." in page(busy)
    assert not User.objects.exists()
