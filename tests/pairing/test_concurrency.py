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
