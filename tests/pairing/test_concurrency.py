"""Single use under real concurrency, on PostgreSQL with real threads."""

import threading

import pytest
from django.contrib.auth.models import User
from django.db import connection

from islands.models import Island
from pairing.models import PairingCode, PairingError

RACERS = 50


def race(target, args_list):
    barrier = threading.Barrier(len(args_list))
    results: list[object] = [None] * len(args_list)

    def run(index, args):
        try:
            barrier.wait()
            results[index] = target(*args)
        except Exception as exc:
            results[index] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(n, args)) for n, args in enumerate(args_list)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.django_db(transaction=True)
def test_fifty_concurrent_redemptions_of_one_code_link_exactly_one_island(postgres, issue_code):
    issued = issue_code()
    users = [User.objects.create_user(f"racer{n}") for n in range(RACERS)]

    def redeem(user):
        row = PairingCode.objects.find(issued.code)
        assert row is not None
        return row.redeem(user)

    results = race(redeem, [(user,) for user in users])

    winners = [result for result in results if isinstance(result, Island)]
    losers = [result for result in results if isinstance(result, PairingError)]
    assert len(winners) == 1, results
    assert len(losers) == RACERS - 1, [r for r in results if not isinstance(r, PairingError | Island)]
    assert Island.objects.count() == 1
    island = Island.objects.get()
    row = PairingCode.objects.get()
    assert row.used_by == island.owner
    assert row.island == island


@pytest.mark.django_db(transaction=True)
def test_two_codes_for_one_host_racing_link_it_once(postgres, issue_code, django_user_model):
    """A host with two redeemable codes (issued over HTTP and NATS) still links to one account."""
    first = issue_code()
    # Skip the retirement of the first code to set up the worst case.
    second_row = PairingCode(host_id=first.row.host_id, channel=PairingCode.Channel.NATS)
    second_code = PairingCode.objects.insert_with_fresh_code(second_row, second_row.created_at)
    users = [django_user_model.objects.create_user(f"racer{n}") for n in range(20)]

    def redeem(user, code):
        return PairingCode.objects.find(code).redeem(user)

    results = race(redeem, [(user, first.code if n % 2 else second_code) for n, user in enumerate(users)])
    assert sum(isinstance(result, Island) for result in results) == 1, results
    assert Island.objects.count() == 1
    # The losing code was rolled back, not half-used.
    assert PairingCode.objects.filter(used_at__isnull=False).count() == 1


@pytest.mark.django_db(transaction=True)
def test_losing_a_confirm_race_is_not_counted_as_a_wrong_guess(postgres, issue_code, alice):
    """40 tabs confirm one right code at once: one links it, and none is left charged.

    Counting comes first, so while the burst is in flight more than five
    attempts at once from one account are refused (429) for the moment;
    what matters is that every right code is refunded, winner or loser.
    """
    from django.test import Client

    issued = issue_code()
    client = Client()
    client.force_login(alice)

    def confirm():
        return client.post("/pair/confirm", {"code": issued.code}, REMOTE_ADDR="192.0.2.60").status_code

    statuses = race(confirm, [() for _ in range(40)])
    assert statuses.count(302) == 1, statuses
    assert set(statuses) <= {302, 409, 422, 429}, statuses
    assert Island.objects.get().owner == alice
    # Nothing left in the wrong-code counters: the account still has all five wrong codes.
    for _ in range(5):
        assert client.post("/pair", {"code": "ZZZZZZ"}, REMOTE_ADDR="192.0.2.61").status_code == 422
    assert client.post("/pair", {"code": "ZZZZZZ"}, REMOTE_ADDR="192.0.2.61").status_code == 429
