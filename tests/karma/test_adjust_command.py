"""`manage.py adjust_karma`: the admin's adjustment from a shell, recorded as an administrator's event."""

import io
import os
import re
import subprocess
import sys
from decimal import Decimal

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command

from karma.models import KarmaEvent
from tests.conftest import BASE_DIR, _test_database_url
from tests.karma.conftest import events, karma, make_island


def adjust(*args: str) -> list[str]:
    out = io.StringIO()
    call_command("adjust_karma", *args, stdout=out)
    return out.getvalue().splitlines()


@pytest.fixture
def staff(db):
    return User.objects.create_user("opsperson", "ops@example.com", "x", is_staff=True)


def test_adjusting_by_host_id_records_an_admin_event_and_prints_the_new_score(island, staff):
    lines = adjust(island.host_id, "-7.5", "--reason", "  Benchmark cheating ", "--by", "opsperson")

    [event] = events(island)
    assert (event.cause, event.delta, event.requested_delta, event.reason, event.actor) == (
        KarmaEvent.Cause.ADMIN,
        Decimal("-7.5"),
        Decimal("-7.5"),
        "Benchmark cheating",
        staff,
    )
    assert karma(island) == Decimal("42.5")
    assert lines == [
        f"Recorded karma event #{event.pk} for “{island.name}” (Island {island.pk}, host {island.host_id}) "
        "by opsperson: -7.50 Benchmark cheating",
        "Karma: 50 -> 42.5",
    ]


def test_adjusting_by_island_id_without_an_actor(island):
    lines = adjust(str(island.pk), "12", "--reason", "Helped test the new runtime")
    [event] = events(island)
    assert (event.delta, event.actor) == (Decimal(12), None)
    assert karma(island) == Decimal(62)
    assert lines[-1] == "Karma: 50 -> 62"
    assert " by " not in lines[0]


def test_the_score_stays_in_range_and_says_so(island):
    adjust(island.host_id, "80", "--reason", "Top of the class")
    lines = adjust(island.host_id, "30", "--reason", "Even more")
    [_, event] = events(island)
    assert (event.requested_delta, event.delta, event.score_after) == (Decimal(30), Decimal(0), Decimal(100))
    assert "Asked for +30.00; karma stays between 0 and 100, so it moved +0.00." in lines
    assert lines[-1] == "Karma: 100 -> 100"


@pytest.mark.parametrize(
    ("delta", "reason", "error"),
    [
        ("0", "Nothing", "delta: A change of zero changes nothing."),
        ("0.00", "Nothing", "delta: A change of zero changes nothing."),
        ("150", "Too much", "delta: Ensure this value is less than or equal to 100."),
        ("-100.01", "Too much", "delta: Ensure this value is greater than or equal to -100."),
        ("1.234", "Too precise", "delta: Ensure that there are no more than 2 decimal places."),
        ("five", "Words", "delta: Enter a number."),
        ("NaN", "Not a number", "delta: Enter a number."),
        ("5", "   ", "--reason: This field is required."),
        ("5", "x" * 201, "--reason: Ensure this value has at most 200 characters (it has 201)."),
    ],
)
def test_a_bad_delta_or_reason_is_refused_and_nothing_is_recorded(island, delta, reason, error):
    with pytest.raises(CommandError) as refused:
        adjust(island.host_id, delta, "--reason", reason)
    assert str(refused.value) == error
    assert not KarmaEvent.objects.exists()
    assert karma(island) == Decimal(50)


def test_an_unknown_island_is_refused(island):
    for named in ("no-such-host", "5a4c2f1e-0000-4000-8000-000000000000"):
        unknown = re.escape(f"No Island has the Island id or host id '{named}'.")
        with pytest.raises(CommandError, match=unknown):
            adjust(named, "5", "--reason", "Who?")
    assert not KarmaEvent.objects.exists()


def test_a_host_id_names_its_active_island_not_the_removed_ones(alice, bob):
    old = make_island(alice, "moved-host-0001", name="Before the move")
    old.remove()
    new = make_island(bob, "moved-host-0001", name="After the move")
    adjust("moved-host-0001", "3", "--reason", "Fine")
    assert events(new)[0].delta == Decimal(3)
    assert events(old) == []


def test_a_host_with_only_removed_islands_must_be_named_by_island_id(alice):
    first = make_island(alice, "gone-host-00001", name="First")
    first.remove()
    second = make_island(alice, "gone-host-00001", name="Second")
    second.remove()
    with pytest.raises(CommandError) as refused:
        adjust("gone-host-00001", "3", "--reason", "Gone")
    message = str(refused.value)
    assert message.startswith("Host 'gone-host-00001' has no active Island, only removed ones (")
    assert str(first.pk) in message and str(second.pk) in message
    assert message.endswith("name one by its Island id.")
    assert not KarmaEvent.objects.exists()
    # Named by its Island id, a removed Island can still be adjusted, as in the admin.
    adjust(str(first.pk), "3", "--reason", "Gone")
    assert events(first)[0].delta == Decimal(3)


def test_an_id_that_is_one_islands_id_and_anothers_host_id_is_refused_unless_told_which(alice, bob):
    target = make_island(alice, "honest-host-001")
    # A host may choose any host id, including another Island's id.
    impostor = make_island(bob, str(target.pk))
    with pytest.raises(CommandError, match=r"names more than one Island .* say which with --only"):
        adjust(str(target.pk), "-5", "--reason", "Misbehaved")
    assert not KarmaEvent.objects.exists()

    adjust(str(target.pk), "-5", "--reason", "Misbehaved", "--only", "island-id")
    adjust(str(target.pk), "-1", "--reason", "Misbehaved too", "--only", "host-id")
    assert [event.delta for event in events(target)] == [Decimal(-5)]
    assert [event.delta for event in events(impostor)] == [Decimal(-1)]


def test_the_actor_must_be_active_staff(island, bob):
    with pytest.raises(CommandError, match=re.escape("No user 'nobody' to record as the actor.")):
        adjust(island.host_id, "5", "--reason", "x", "--by", "nobody")
    with pytest.raises(CommandError, match="'bob' is not active staff"):
        adjust(island.host_id, "5", "--reason", "x", "--by", "bob")
    assert not KarmaEvent.objects.exists()


def test_the_command_line_takes_a_negative_delta(transactional_db, alice):
    """Run as an operator would: a negative delta is a value, not an option, and errors exit non-zero."""
    island = make_island(alice, "cli-host-000001")
    argv = [sys.executable, "manage.py", "adjust_karma", "cli-host-000001"]
    env = {**os.environ, "DATABASE_URL": _test_database_url()}
    done = subprocess.run(
        [*argv, "-4", "--reason", "Missed a deadline"], cwd=BASE_DIR, capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "Karma: 50 -> 46"
    refused = subprocess.run(
        [*argv, "0", "--reason", "Nothing"], cwd=BASE_DIR, capture_output=True, text=True, env=env
    )
    assert refused.returncode == 1
    assert "CommandError: delta: A change of zero changes nothing." in refused.stderr
    assert karma(island) == Decimal(46)
