"""The fleet view on "Your Islands": summary, table, sort, filter, search, query counts."""

import re
from datetime import timedelta
from decimal import Decimal

import pytest
import time_machine

from islands.models import Island, Job
from tests.islands.conftest import T0, beat, give_job, make_island

NOW = T0 + timedelta(seconds=10)


def page(client, when=NOW, **params):
    with time_machine.travel(when, tick=False):
        response = client.get("/settings", params)
    assert response.status_code == 200
    return response.content.decode()


def text(html):
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


def summary(html):
    match = re.search(r'<p class="fleet-summary"[^>]*>(.*?)</p>', html, re.S)
    assert match, "no summary line"
    return text(match.group(1))


def rows(html):
    """The names of the table's Islands, in order."""
    return re.findall(r'<td class="name"><a href="[^"]+">([^<]+)</a>', html)


def finish(island, job_id, state, credits, at):
    give_job(island=island, job_id=job_id, credits=Decimal(credits), now=at - timedelta(minutes=1))
    Job.objects.apply_status(island, job_id, state, now=at)


@pytest.fixture
def fleet(alice, bob):
    """Alice's five Islands at NOW: two online, one down, one signed off, one waiting."""
    a = make_island(alice, "alpha-host-00001", name="Alpha")
    b = make_island(alice, "bravo-host-00001", name="Bravo")
    c = make_island(alice, "charlie-host-001", name="Charlie")
    d = make_island(alice, "delta-host-00001", name="Delta")
    e = make_island(alice, "echo-host-000001", name="Echo")
    beat([a, b], T0)
    beat(c, T0 - timedelta(minutes=10))
    beat(d, T0 - timedelta(minutes=10))
    beat(d, T0 - timedelta(minutes=9), status="offline")
    other = make_island(bob, "bob-host-0000001", name="Bob's")
    beat(other, T0)
    # Today (UTC): two completed, one failed; 3 days ago one more paid; 10 days ago, out of the window.
    finish(a, "job-1", "succeeded", "2.5", T0 - timedelta(hours=1))
    finish(a, "job-2", "succeeded", "1", T0 - timedelta(hours=2))
    finish(b, "job-3", "failed", "9", T0 - timedelta(hours=1))
    finish(b, "job-4", "succeeded", "4", T0 - timedelta(days=3))
    finish(c, "job-5", "succeeded", "100", T0 - timedelta(days=10))
    finish(other, "job-6", "succeeded", "50", T0 - timedelta(hours=1))
    return {"a": a, "b": b, "c": c, "d": d, "e": e}


def test_the_summary_line_counts_online_jobs_today_and_a_weeks_earnings(fleet, alice_client):
    line = summary(page(alice_client))
    assert line == (
        "2 of 5 online · Jobs today (UTC): 2 completed, 1 failed · Earned in the last 7 days: 7.5 credits"
    )


def test_a_new_user_has_no_summary(alice_client):
    html = page(alice_client)
    assert "fleet-summary" not in html
    assert "No Islands yet" in html


def test_many_islands_are_a_table_sorted_with_the_down_ones_first(fleet, alice_client, alice):
    for n in range(3):
        make_island(alice, f"extra-host-{n:05d}", name=f"Extra {n}")
    html = page(alice_client)
    assert '<table class="table fleet">' in html and 'class="card island"' not in html
    # Down, then waiting (by name), then signed off, then online.
    assert rows(html) == ["Charlie", "Echo", "Extra 0", "Extra 1", "Extra 2", "Delta", "Alpha", "Bravo"]
    assert "Bob" not in html


def test_few_islands_are_cards_unless_the_table_is_asked_for(fleet, alice_client):
    assert page(alice_client).count('class="card island"') == 5
    html = page(alice_client, view="table")
    assert rows(html) == ["Charlie", "Echo", "Delta", "Alpha", "Bravo"]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # Alpha earned 3.5, Bravo 4, Charlie 100 (ten days ago: all time counts here).
        ({"sort": "earnings"}, ["Charlie", "Bravo", "Alpha", "Delta", "Echo"]),
        ({"sort": "earnings", "order": "asc"}, ["Delta", "Echo", "Alpha", "Bravo", "Charlie"]),
        ({"sort": "name", "order": "desc"}, ["Echo", "Delta", "Charlie", "Bravo", "Alpha"]),
        ({"sort": "heartbeat"}, ["Alpha", "Bravo", "Delta", "Charlie", "Echo"]),
        ({"sort": "bogus"}, ["Charlie", "Echo", "Delta", "Alpha", "Bravo"]),
    ],
)
def test_the_table_sorts_by_the_column_asked(fleet, alice_client, params, expected):
    assert rows(page(alice_client, view="table", **params)) == expected


def test_the_table_sorts_by_karma(fleet, alice_client):
    # The failure cost Bravo karma; the successes earned Alpha some.
    html = page(alice_client, view="table", sort="karma")
    order = rows(html)
    assert order[0] == "Alpha" and order[-1] == "Bravo"


def test_column_headers_are_links_that_flip_the_order(fleet, alice_client):
    html = page(alice_client, view="table", sort="earnings")
    assert (
        '<th scope="col" aria-sort="descending"><a href="?view=table&amp;sort=earnings&amp;order=asc">'
        in html
    )
    assert 'aria-sort="none"><a href="?view=table&amp;sort=karma&amp;order=desc">Karma</a>' in html


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"status": "online"}, ["Alpha", "Bravo"]),
        ({"status": "offline"}, ["Charlie"]),
        ({"status": "signed_off"}, ["Delta"]),
        ({"status": "new"}, ["Echo"]),
        ({"q": "char"}, ["Charlie"]),
        ({"q": "BRAVO-HOST"}, ["Bravo"]),
        ({"q": "a", "status": "online"}, ["Alpha", "Bravo"]),
        ({"status": "nonsense"}, ["Charlie", "Echo", "Delta", "Alpha", "Bravo"]),
    ],
)
def test_filter_by_status_and_search_by_name_or_host_id(fleet, alice_client, params, expected):
    html = page(alice_client, view="table", **params)
    assert rows(html) == expected
    # The summary is the whole fleet's, whatever is shown.
    assert summary(html).startswith("2 of 5 online")


def test_a_search_matching_nothing_says_so(fleet, alice_client):
    html = page(alice_client, q="zebra")
    assert "No Islands match “zebra”" in text(html)
    assert "No Islands yet" not in html


def test_another_users_islands_never_match(fleet, alice_client):
    assert rows(page(alice_client, view="table", q="bob")) == []


@pytest.mark.parametrize("layout", ["cards", "table"])
def test_the_page_costs_the_same_queries_for_one_island_or_five_hundred(
    alice, alice_client, django_assert_max_num_queries, layout
):
    make_island(alice, "host-00000000")
    with django_assert_max_num_queries(7) as one:
        html = page(alice_client, view=layout)
    assert html.count('data-island="') == 1
    Island.objects.bulk_create(
        Island(
            owner=alice, host_id=f"host-{n:08d}", name=f"Island {n}", last_heartbeat_at=T0, offline_after=NOW
        )
        for n in range(1, 500)
    )
    with django_assert_max_num_queries(7) as five_hundred:
        html = page(alice_client, view=layout, sort="status")
    marker = 'class="card island"' if layout == "cards" else 'class="island-row"'
    assert html.count(marker) == 500
    print(f"/settings ({layout}) queries: 1 Island -> {len(one)}, 500 Islands -> {len(five_hundred)}")
    assert len(one) == len(five_hundred)
