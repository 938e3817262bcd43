"""`manage.py island --fleet N --owner USER`: simulated Islands at different karma, and real placements."""

import io
import os
import re
import signal
import subprocess
import sys
import time
from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command

from islands.models import Attempt, DispatcherKey, Island, Job
from karma.models import KarmaEvent
from simulator import fleet
from simulator.desktop import SIMULATOR_VERSION, Client
from tests.conftest import BASE_DIR, _test_database_url
from tests.islands.conftest import make_island

DEMO = {"workload": "llm-chat", "runtime": "container", "budget": "2", "lease_seconds": 300}


def test_karma_is_spread_from_90_down_to_30():
    assert fleet.spread(1) == [Decimal(90)]
    assert fleet.spread(3) == [Decimal(90), Decimal(60), Decimal(30)]
    assert fleet.spread(4) == [Decimal(90), Decimal(70), Decimal(50), Decimal(30)]


def test_the_fleet_is_made_like_paired_islands_with_karma_by_recorded_events(alice):
    members = fleet.assemble(alice, fleet.spread(3))

    islands = list(Island.objects.filter(owner=alice).order_by("host_id"))
    assert [island.host_id for island in islands] == [f"demo-{alice.pk}-{n}" for n in (1, 2, 3)]
    assert [island.name for island in islands] == ["Demo Island 1", "Demo Island 2", "Demo Island 3"]
    for island, member in zip(islands, members, strict=True):
        assert (island.kind, island.transport, island.agent_version) == ("desktop", "http", SIMULATOR_VERSION)
        assert island.cpu_cores == os.cpu_count()
        assert Island.objects.authenticate(member.token) == island
    assert [island.karma for island in islands] == [Decimal(90), Decimal(60), Decimal(30)]
    events = KarmaEvent.objects.filter(island__owner=alice).order_by("island__host_id")
    assert [(event.cause, event.delta, event.reason, event.actor) for event in events] == [
        ("admin", Decimal(40), "demo fleet: karma set to 90 by manage.py island --fleet", None),
        ("admin", Decimal(10), "demo fleet: karma set to 60 by manage.py island --fleet", None),
        ("admin", Decimal(-20), "demo fleet: karma set to 30 by manage.py island --fleet", None),
    ]


def test_running_it_again_takes_the_same_islands_back(alice):
    first = fleet.assemble(alice, fleet.spread(2))
    # Its jobs moved one Island's karma since.
    KarmaEvent.objects.adjust(first[1].island, Decimal(3), "a job well done", by=None)

    again = fleet.assemble(alice, fleet.spread(2))

    assert [member.island.pk for member in again] == [member.island.pk for member in first]
    assert Island.objects.filter(owner=alice).count() == 2
    # New tokens: the old ones stop working, as when a host pairs again.
    assert Island.objects.authenticate(first[0].token) is None
    assert Island.objects.authenticate(again[0].token) == first[0].island
    assert [member.karma for member in again] == [Decimal(90), Decimal(30)]
    # Only the Island that moved needed an event to go back.
    assert KarmaEvent.objects.filter(island=first[0].island).count() == 1
    assert list(
        KarmaEvent.objects.filter(island=first[1].island).order_by("id").values_list("delta", flat=True)
    ) == [
        Decimal(-20),
        Decimal(3),
        Decimal(-3),
    ]


def test_a_host_id_linked_to_another_account_is_left_alone(alice, bob):
    taken = make_island(bob, f"demo-{alice.pk}-1")
    with pytest.raises(fleet.FleetError, match="linked to another account's Island"):
        fleet.assemble(alice, fleet.spread(1))
    assert not Island.objects.filter(owner=alice).exists()
    assert not KarmaEvent.objects.exists()
    taken.refresh_from_db()
    assert taken.owner == bob


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--fleet", "3"], "--fleet needs --owner USERNAME"),
        (["--fleet", "3", "--owner", "nobody"], "No user 'nobody': sign up at /accounts/signup/ first."),
        (["--fleet", "0", "--owner", "alice"], "--fleet: from 1 to 20 Islands."),
        (["--fleet", "21", "--owner", "alice"], "--fleet: from 1 to 20 Islands."),
        (["--fleet", "2", "--owner", "alice", "--karma", "90"], "--karma: one value per Island (2)"),
        (["--fleet", "2", "--owner", "alice", "--karma", "90,101"], "--karma: each from 0 to 100"),
        (["--fleet", "2", "--owner", "alice", "--karma", "90,x"], "--karma: numbers, comma-separated"),
        (["--fleet", "2", "--owner", "alice", "--state", "state.json"], "leave out --mobile and --state"),
        (["--fleet", "2", "--owner", "alice", "--capacity", "0"], "--capacity: from 1 to 4096"),
        (["--owner", "alice"], "--owner and --karma go with --fleet."),
    ],
)
def test_the_fleet_command_says_what_is_wrong_and_makes_nothing(alice, argv, error):
    with pytest.raises(CommandError, match=re.escape(error)):
        call_command("island", *argv, stdout=io.StringIO())
    assert not Island.objects.exists()
    assert not KarmaEvent.objects.exists()


def test_a_fleet_with_nothing_to_talk_to_says_so(alice):
    with pytest.raises(
        CommandError, match=re.escape("Nothing answers at http://127.0.0.1:9: start the server")
    ):
        call_command(
            "island", "--fleet", "1", "--owner", "alice", "--url", "http://127.0.0.1:9", stdout=io.StringIO()
        )


def test_a_coordinator_that_does_not_know_the_tokens_is_named(daphne_server, alice):
    """As when the server uses another database than the command: its tokens are unknown there."""
    [member] = fleet.assemble(alice, fleet.spread(1))
    stranger = fleet.Member(member.island, "isl_" + "x" * 43, member.karma)
    demo = fleet.Fleet(daphne_server.url, [stranger], out=io.StringIO(), interval=1)
    with pytest.raises(
        fleet.FleetError, match="does not know the fleet's tokens: is it serving this database"
    ):
        demo.go_online()


def wait_for(condition, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_thirty_jobs_spread_over_the_fleet_by_karma(daphne_server, alice, tmp_path):
    """The README's demo: a fleet of three, thirty submissions over HTTP, and where they went."""
    log = tmp_path / "fleet.log"
    argv = [sys.executable, "manage.py", "island", "--fleet", "3", "--owner", "alice"]
    env = {**os.environ, "DATABASE_URL": _test_database_url()}
    with log.open("w") as sink:
        process = subprocess.Popen(
            [*argv, "--url", daphne_server.url, "--interval", "0.3"],
            cwd=BASE_DIR,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        wait_for(lambda: "online at" in log.read_text(), "the fleet to come online")
        _, key = DispatcherKey.objects.issue("readme")
        dispatcher = Client(daphne_server.url, token=key)
        answers = [
            dispatcher.post("/api/v1/jobs", {"job_id": f"spread-{n}", **DEMO, "input": {"n": n}})
            for n in range(30)
        ]
        assert [status for status, _ in answers] == [201] * 30, answers
        wait_for(
            lambda: Job.objects.filter(state=Job.State.SUCCEEDED).count() == 30,
            "every job to succeed",
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()
    lines = output.splitlines()

    fleet_islands = {island.host_id: island for island in Island.objects.filter(owner=alice)}
    assert sorted(fleet_islands) == [f"demo-{alice.pk}-{n}" for n in (1, 2, 3)]
    # Each answer named a fleet Island, and the database agrees with it.
    for _, body in answers:
        job = Job.objects.get(job_id=body["job"]["job_id"])
        assert job.island.host_id == body["job"]["host_id"] in fleet_islands
    placed = {host: Attempt.objects.filter(island=island).count() for host, island in fleet_islands.items()}
    assert sum(placed.values()) == 30
    top, _, bottom = (placed[f"demo-{alice.pk}-{n}"] for n in (1, 2, 3))
    # Karma 90 against 30 is a weight of 9 to 1: 19 against 2 expected, and
    # the top one getting fewer than the bottom one would take a miracle.
    assert top > bottom

    # A line per job taken, under the Island that took it.
    taken = [re.match(r"\[(Demo Island \d) karma +(\d+)\] Took job (spread-\d+): ", line) for line in lines]
    taken_by = {match.group(3): match.group(1) for match in taken if match}
    assert len(taken_by) == 30
    for job_id, name in taken_by.items():
        assert Job.objects.get(job_id=job_id).island.name == name
    # Where they went, at the end.
    table = lines[lines.index("Jobs placed on the fleet while it ran: 30") + 1 :]
    assert table[0].split() == ["Island", "karma", "karma²", "share", "jobs", "share", "karma", "now"]
    for row, n, karma, expected in zip(
        table[1:4], (1, 2, 3), (90, 60, 30), ("64.3%", "28.6%", "7.1%"), strict=True
    ):
        host = f"demo-{alice.pk}-{n}"
        jobs, now = placed[host], fleet_islands[host]
        now.refresh_from_db()
        # Every job succeeded, so an Island that took some ends above where it began.
        assert (now.karma > karma) == (jobs > 0)
        assert row.split() == [
            "Demo",
            "Island",
            str(n),
            str(karma),
            expected,
            str(jobs),
            f"{jobs / 30:.1%}",
            str(int(now.karma)),
        ]
    assert lines[-1] == "Stopped."
    assert output.count("Signed off: the coordinator shows this Island as offline.") == 3, output
    assert {island.status for island in Island.objects.filter(owner=alice)} == {Island.Status.SIGNED_OFF}
