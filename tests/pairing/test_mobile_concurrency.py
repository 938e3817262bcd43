"""Single use of mobile sessions under real concurrency, on PostgreSQL with real threads."""

import json
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from islands.models import Island
from pairing.limits import MOBILE_REDEEM_PER_IP
from pairing.models import HostIdTaken, MobilePairingSession, PairingError
from tests.pairing.conftest import IPHONE, MOBILE_PAIR, PHONE_HOST_ID, device
from tests.pairing.test_concurrency import race

RACERS = 50


@pytest.mark.django_db(transaction=True)
def test_fifty_phones_racing_for_one_session_link_exactly_one(postgres, alice):
    opened = MobilePairingSession.objects.open(alice)

    def redeem(n):
        # Half type the code, half scan the QR code: both doors lead to one row.
        credential: dict[str, Any] = {"code": opened.code} if n % 2 else {"secret": opened.secret}
        return MobilePairingSession.objects.redeem(
            host_id=f"racing-phone-{n:04}", device=device(), **credential
        )

    results = race(redeem, [(n,) for n in range(RACERS)])

    winners = [result for result in results if not isinstance(result, Exception)]
    losers = [result for result in results if isinstance(result, PairingError)]
    assert len(winners) == 1, results
    assert len(losers) == RACERS - 1, [r for r in results if isinstance(r, Exception) and r not in losers]
    island = Island.objects.get()
    assert island == winners[0].island
    assert Island.objects.authenticate(winners[0].token) == island
    session = MobilePairingSession.objects.get()
    assert session.island == island
    assert session.used_at is not None


@pytest.mark.django_db(transaction=True)
def test_one_phone_racing_into_two_accounts_joins_one(postgres):
    owners = [User.objects.create_user(f"owner{n}") for n in range(10)]
    sessions = [MobilePairingSession.objects.open(owner) for owner in owners]

    def redeem(opened):
        return MobilePairingSession.objects.redeem(
            secret=opened.secret, host_id=PHONE_HOST_ID, device=device()
        )

    results = race(redeem, [(opened,) for opened in sessions])

    assert sum(not isinstance(result, Exception) for result in results) == 1, results
    assert all(isinstance(r, HostIdTaken) for r in results if isinstance(r, Exception)), results
    assert Island.objects.count() == 1
    # The losers' sessions were rolled back, not half-used.
    assert MobilePairingSession.objects.filter(used_at__isnull=False).count() == 1


@pytest.mark.django_db(transaction=True)
def test_phones_losing_a_race_for_the_right_code_are_not_counted_as_wrong_guesses(postgres, alice):
    """40 requests of one address redeem one right code at once: one pairs, and none is left charged."""
    opened = MobilePairingSession.objects.open(alice)

    def pair(n):
        body = {"code": opened.code, "host_id": f"racing-phone-{n:04}", "device": IPHONE}
        response = Client().post(
            MOBILE_PAIR, json.dumps(body), content_type="application/json", REMOTE_ADDR="192.0.2.70"
        )
        return response.status_code

    statuses = race(pair, [(n,) for n in range(40)])

    assert statuses.count(201) == 1, statuses
    # Counting comes first: while the burst is in flight, attempts past the
    # address's 30 are refused for the moment; none stays counted.
    assert set(statuses) <= {201, 401, 429}, statuses
    wrong = {"code": "ZZZZZZ", "host_id": PHONE_HOST_ID, "device": IPHONE}

    def guess():
        body = json.dumps(wrong)
        return Client().post(MOBILE_PAIR, body, content_type="application/json", REMOTE_ADDR="192.0.2.70")

    assert [guess().status_code for _ in range(MOBILE_REDEEM_PER_IP[0].max_hits)] == [401] * 30
    assert guess().status_code == 429
