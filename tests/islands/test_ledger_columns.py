"""Island.save() refuses, loudly, to write what only the ledgers may change."""

from decimal import Decimal

import pytest

from islands.models import Island, LedgerFieldWrite
from karma.models import KarmaEvent
from tests.islands.conftest import make_island

LEDGER = [("karma", Decimal(10)), ("jobs_completed", 7), ("jobs_failed", 3), ("earnings", Decimal("9.5"))]


@pytest.mark.parametrize(("name", "value"), LEDGER)
def test_saving_a_changed_ledger_column_raises_and_writes_nothing(island, name, value):
    before = Island.objects.values("name", name).get(pk=island.pk)
    island.name = "Renamed"
    setattr(island, name, value)
    with pytest.raises(LedgerFieldWrite, match=name):
        island.save()
    with pytest.raises(LedgerFieldWrite, match=name):
        island.save(update_fields=[name, "name"])
    assert Island.objects.values("name", name).get(pk=island.pk) == before


def test_a_full_save_of_an_unchanged_ledger_writes_the_rest_and_keeps_the_ledgers_own_changes(island):
    stale = Island.objects.get(pk=island.pk)
    KarmaEvent.objects.adjust(island, Decimal(5), "a good week", by=None)
    stale.name = "Garage rig"
    stale.save()  # loaded before the adjustment: its karma is stale, and not written
    fresh = Island.objects.get(pk=island.pk)
    assert (fresh.name, fresh.karma) == ("Garage rig", Decimal(55))


def test_refreshing_takes_the_ledger_as_it_now_is(island):
    KarmaEvent.objects.adjust(island, Decimal(-5), "a bad week", by=None)
    island.refresh_from_db()
    island.name = "Attic box"
    island.save()
    assert Island.objects.values_list("name", "karma").get(pk=island.pk) == ("Attic box", Decimal(45))
    island.refresh_from_db(fields=["karma"])
    island.save()


def test_a_new_island_may_start_with_any_ledger_values_and_is_guarded_after(alice):
    island = make_island(alice, karma=Decimal(80), jobs_completed=2)
    assert Island.objects.values_list("karma", "jobs_completed").get(pk=island.pk) == (Decimal(80), 2)
    island.karma = Decimal(90)
    with pytest.raises(LedgerFieldWrite, match="karma"):
        island.save()
