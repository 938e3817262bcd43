"""Single use of mobile sessions under real concurrency, on PostgreSQL with real threads."""

from typing import Any

import pytest
from django.contrib.auth.models import User

from islands.models import Island
from pairing.models import HostIdTaken, MobilePairingSession, PairingError
from tests.pairing.conftest import PHONE_HOST_ID, device
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
