"""What people see: /reference/karma, the Karma field on each card, and the Island page."""

import re
from datetime import timedelta
from decimal import Decimal

import pytest

from islands.models import Island, Job
from karma import rules
from karma.models import KarmaEvent
from tests.islands.test_replacement import keep_online, online
from tests.islands.test_settings_page import card, field
from tests.karma.conftest import T0, beat, give, karma, make_island, run_job, watch


def text(html: str) -> str:
    """The page's words, tags stripped (inline ones without a space), whitespace collapsed."""
    html = re.sub(r"</?(strong|code|sup|a|span|time)\b[^>]*>", "", html)
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


def rows(html: str, table_id: str) -> list[list[str]]:
    table = html[html.index(f'id="{table_id}"') :]
    table = table[: table.index("</table>")]
    return [
        [text(cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
        for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)
        if "<td" in row
    ]


# --- /reference/karma -------------------------------------------------------------------


def test_the_reference_is_public_and_states_the_rules_with_their_numbers(client, db):
    response = client.get("/reference/karma")
    assert response.status_code == 200
    html = response.content.decode()
    assert "New Islands start at 50 (Harbor)" in text(html)
    assert rows(html, "karma-levels") == [
        ["Adrift", "0 to below 25", "Gets no jobs until its karma reaches the placement floor."],
        ["Anchored", "25 to below 40", "Gets jobs, but rarely: every point of karma counts."],
        ["Harbor", "40 to below 70", "Where every new Island starts."],
        ["Lighthouse", "70 to below 90", "Reliable: a steady share of jobs."],
        ["Flagship", "90 to 100", "The most reliable Islands: the largest share of jobs."],
    ]
    assert rows(html, "karma-jobs") == [
        ["Succeeded, started within 15 s of assignment", "+1"],
        ["Succeeded, started within 1 min of assignment", "+0.5"],
        ["Succeeded, started later or never reported its start", "+0.25"],
        ["Failed", "−2"],
        ["Timed out: no final state before the lease expired", "−4"],
        ["Cancelled", "±0"],
    ]
    assert rows(html, "karma-disconnections") == [
        ["14 min 59 s", "±0"],
        ["15 min 1 s", "−1"],
        ["1 h", "−3"],
        ["2 h", "−7"],
        ["2 h 30 min 1 s", "−10"],
        ["24 h", "−10"],
        ["Any time, after signing off", "±0"],
    ]
    assert "a grace period of 15 min it loses 1 karma, and 1 more every 15 min" in text(html)
    assert "One disconnection costs at most 10 (reached after 2 h 30 min)" in text(html)
    assert "An Island online for a whole day earns +1." in text(html)
    assert "Islands below 25 karma get no jobs." in text(html)
    assert (
        "A new Island is on probation until it has completed 10 jobs: until then it is drawn as if "
        "its karma were at most 25, whatever its karma says." in text(html)
    )
    assert "from its 10th completed job on" in text(html)
    assert rows(html, "karma-placement") == [
        ["100", "10,000", "55.2%"],
        ["75", "5,625", "31.0%"],
        ["50", "2,500", "13.8%"],
        ["20", "0", "0.0%"],
    ]


def test_the_reference_follows_the_rules_and_so_does_karma(client, island, monkeypatch):
    monkeypatch.setattr(rules, "JOB_FAILED", Decimal("-3.5"))
    monkeypatch.setattr(rules, "DISCONNECTION_GRACE", timedelta(minutes=30))
    monkeypatch.setattr(rules, "UPTIME_DAY_BONUS", Decimal(2))
    monkeypatch.setattr(rules, "PLACEMENT_FLOOR", Decimal(10))
    monkeypatch.setattr(rules, "PROBATION_JOBS", 3)
    monkeypatch.setattr(
        rules, "LEVELS", (rules.Level("Sandbar", Decimal(0), "…"), rules.Level("Atoll", Decimal(60), "…"))
    )
    html = client.get("/reference/karma").content.decode()
    assert ["Failed", "−3.5"] in rows(html, "karma-jobs")
    assert "a grace period of 30 min" in text(html)
    assert rows(html, "karma-disconnections")[:2] == [["29 min 59 s", "±0"], ["30 min 1 s", "−1"]]
    assert "earns +2." in text(html)
    assert "Islands below 10 karma get no jobs." in text(html)
    assert "on probation until it has completed 3 jobs" in text(html)
    assert ["20", "400", "2.2%"] in rows(html, "karma-placement")
    assert [row[0] for row in rows(html, "karma-levels")] == ["Sandbar", "Atoll"]
    # What the page says is what happens.
    run_job(island, "job-1", T0, "failed", timedelta(seconds=1))
    assert karma(island) == Decimal("46.5")


def test_the_public_sites_address_with_a_slash_works_too(client, db):
    response = client.get("/reference/karma/")
    assert response.status_code == 301
    assert response["Location"] == "/reference/karma"


def test_your_islands_links_to_the_reference(alice_client):
    html = alice_client.get("/settings").content.decode()
    assert "Build karma early" in html
    assert 'href="/reference/karma"' in html


# --- The card -------------------------------------------------------------------------------


def karma_field(client, island):
    return field(card(client.get("/settings").content.decode(), island), "Karma")


@pytest.mark.parametrize(
    ("score", "shown", "bar"),
    [
        ("50", "Harbor · 50 33% to Lighthouse", 'value="33"'),
        ("62.5", "Harbor · 62.5 75% to Lighthouse", 'value="75"'),
        ("24.99", "Adrift · 24.99 99% to Anchored", 'value="99"'),
        ("95", "Flagship · 95 Top level", 'value="100"'),
    ],
)
def test_a_card_shows_level_score_and_progress_to_the_next_level(alice, alice_client, score, shown, bar):
    island = make_island(alice)
    Island.objects.filter(pk=island.pk).update(karma=Decimal(score))
    _, words = karma_field(alice_client, island)
    assert words == shown
    html = card(alice_client.get("/settings").content.decode(), island)
    assert re.search(rf'<progress class="karma-bar" max="100" {bar}', html)


def test_the_karma_field_sits_between_hardware_and_jobs_completed_as_in_the_seed(alice, alice_client):
    island = make_island(alice)
    labels = re.findall(r"<dt>(.*?)</dt>", card(alice_client.get("/settings").content.decode(), island))
    assert labels[labels.index("Hardware") + 1] == "Karma"
    assert labels[labels.index("Karma") + 1] == "Jobs completed"


def test_a_card_follows_the_islands_karma(alice, alice_client):
    island = make_island(alice)
    run_job(island, "job-1", T0, "succeeded", timedelta(seconds=1))
    assert karma_field(alice_client, island)[1] == "Harbor · 51 36% to Lighthouse"


def test_a_card_opens_the_island_page(alice, alice_client):
    island = make_island(alice)
    html = card(alice_client.get("/settings").content.decode(), island)
    assert f'href="/settings/islands/{island.pk}"' in html


# --- The Island page --------------------------------------------------------------------------


def test_the_island_page_says_why_karma_moved_newest_first(alice, alice_client):
    island = make_island(alice, name="Garage rig")
    run_job(island, "job-1", T0, "succeeded", timedelta(seconds=3))
    run_job(island, "job-2", T0 + timedelta(minutes=5), "failed", timedelta(seconds=3))
    beat(island, T0 + timedelta(minutes=10))
    watch(T0 + timedelta(minutes=10, seconds=45) + timedelta(minutes=16))
    KarmaEvent.objects.adjust(
        island, Decimal(5), "Our outage, not yours", by=None, now=T0 + timedelta(hours=1)
    )
    response = alice_client.get(f"/settings/islands/{island.pk}")
    assert response.status_code == 200
    html = response.content.decode()
    assert "Garage rig" in html
    assert "Harbor · 53 43% to Lighthouse (at 70)" in text(html)
    events = re.findall(r'<tr class="karma-event" data-cause="(\w+)">(.*?)</tr>', html, re.S)
    assert [
        (cause, [text(cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)])
        for cause, row in events
    ] == [
        ("admin", ["2026-03-01 13:00:00", "+5", "53", "Our outage, not yours"]),
        ("disconnection", ["2026-03-01 12:25:45", "−1", "48", "Offline without signing off for 15 min"]),
        ("job", ["2026-03-01 12:05:33", "−2", "49", "Job job-2 failed"]),
        ("job", ["2026-03-01 12:00:33", "+1", "51", "Job job-1 succeeded; started 3 s after assignment"]),
    ]


def test_a_capped_change_says_what_was_asked(alice, alice_client):
    island = make_island(alice)
    KarmaEvent.objects.adjust(island, Decimal(80), "Founding Island", by=None, now=T0)
    html = alice_client.get(f"/settings/islands/{island.pk}").content.decode()
    assert "+50 53" not in text(html)
    assert "Founding Island (+80 asked, capped at 100)" in text(html)


def test_a_new_island_has_no_changes_yet(alice, alice_client):
    island = make_island(alice)
    html = alice_client.get(f"/settings/islands/{island.pk}").content.decode()
    assert "No changes yet" in html
    assert 'href="/reference/karma"' in html


def test_only_the_owner_sees_an_islands_page(alice, bob_client, client):
    island = make_island(alice)
    assert bob_client.get(f"/settings/islands/{island.pk}").status_code == 404
    response = client.get(f"/settings/islands/{island.pk}")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_a_removed_islands_page_is_gone(alice, alice_client):
    island = make_island(alice)
    island.remove()
    assert alice_client.get(f"/settings/islands/{island.pk}").status_code == 404


def test_the_island_page_lists_the_newest_50_events(alice, alice_client):
    island = make_island(alice)
    for n in range(55):
        KarmaEvent.objects.adjust(island, Decimal("0.1"), f"Adjustment {n}", by=None)
    html = alice_client.get(f"/settings/islands/{island.pk}").content.decode()
    assert html.count('class="karma-event"') == 50
    assert "Adjustment 54" in html and "Adjustment 5<" in html and "Adjustment 4<" not in html


def attempt_rows(html: str) -> list[tuple[str, list[str]]]:
    found = re.findall(r'<tr class="attempt" data-outcome="(\w+)">(.*?)</tr>', html, re.S)
    return [
        (outcome, [text(cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)])
        for outcome, row in found
    ]


def test_the_island_page_lists_the_jobs_placed_on_it_newest_first(alice, alice_client):
    island = make_island(alice)
    run_job(island, "job-1", T0, "succeeded", timedelta(seconds=3))
    run_job(island, "job-2", T0 + timedelta(minutes=5), "failed", timedelta(seconds=3))
    give(island, "job-3", T0 + timedelta(minutes=10))
    html = alice_client.get(f"/settings/islands/{island.pk}").content.decode()
    assert attempt_rows(html) == [
        ("running", ["2026-03-01 12:10:00", "job-3", "llm-chat", "1", "Running", "1 offered", "–"]),
        ("failed", ["2026-03-01 12:05:00", "job-2", "llm-chat", "1", "Failed", "1 offered", "33 s"]),
        ("succeeded", ["2026-03-01 12:00:00", "job-1", "llm-chat", "1", "Succeeded", "1", "33 s"]),
    ]


def test_a_job_moved_elsewhere_stays_on_the_first_islands_page_as_timed_out(
    alice, bob, alice_client, bob_client
):
    first = online(make_island(alice, "first-host-001"))
    give(first, "job-1", T0)
    second = online(make_island(bob, "second-host-01"))
    keep_online(first, second)
    watch(T0 + timedelta(minutes=5, seconds=1))
    job = Job.objects.get(job_id="job-1")
    assert (job.island, job.attempt) == (second, 2)
    first_rows = attempt_rows(alice_client.get(f"/settings/islands/{first.pk}").content.decode())
    assert [(outcome, cells[1], cells[3]) for outcome, cells in first_rows] == [("timed_out", "job-1", "1")]
    second_rows = attempt_rows(bob_client.get(f"/settings/islands/{second.pk}").content.decode())
    assert [(outcome, cells[1], cells[3]) for outcome, cells in second_rows] == [("running", "job-1", "2")]


def test_the_island_page_lists_the_newest_50_attempts(alice, alice_client):
    island = make_island(alice)
    for n in range(53):
        run_job(island, f"job-{n}", T0 + timedelta(minutes=n), "succeeded", timedelta(seconds=1))
    html = alice_client.get(f"/settings/islands/{island.pk}").content.decode()
    jobs = [cells[1] for _, cells in attempt_rows(html)]
    assert len(jobs) == 50 and jobs[0] == "job-52" and jobs[-1] == "job-3"


def test_an_island_with_no_jobs_says_so(alice, alice_client):
    island = make_island(alice)
    assert "No jobs yet." in alice_client.get(f"/settings/islands/{island.pk}").content.decode()
