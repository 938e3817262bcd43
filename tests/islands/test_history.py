"""The Island page's last 30 days: uptime from the status-change ledger, jobs, earnings, karma."""

import re
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import time_machine

from islands.history import island_history
from islands.models import Island, Job, MaintenanceWindow, StatusChange
from karma.models import KarmaEvent
from tests.islands.conftest import give_job, make_island

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
PAIRED = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def at(day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(2026, 3, day, hour, minute, tzinfo=UTC)


def change(island: Island, when: datetime, from_status: str, to_status: str, reason: str) -> None:
    StatusChange.objects.create(
        island=island, at=when, from_status=from_status, to_status=to_status, reason=reason
    )


@pytest.fixture
def island(alice):
    """Online from the 8th, down 6 h on the 9th, signed off since 22:00 on the 9th."""
    island = make_island(alice, paired_at=PAIRED)
    change(island, at(8), "offline", "online", "first_heartbeat")
    change(island, at(9, 12), "online", "offline", "silence")
    change(island, at(9, 18), "offline", "online", "back_online")
    change(island, at(9, 22), "online", "signed_off", "graceful")
    Island.objects.filter(pk=island.pk).update(
        status="signed_off", last_heartbeat_at=at(9, 22), offline_after=at(9, 22)
    )
    island.refresh_from_db()
    return island


def page(client, island):
    with time_machine.travel(NOW, tick=False):
        return client.get(f"/settings/islands/{island.pk}").content.decode()


def uptime_titles(html: str) -> list[str]:
    bar = html.split('class="day-bar uptime"', 1)[1].split('class="legend"', 1)[0]
    return re.findall(r'role="listitem" title="([^"]*)"', bar)


def test_the_uptime_bar_has_a_segment_per_utc_day_with_its_share_online(alice_client, island):
    html = page(alice_client, island)
    assert "<h3" in html and "Uptime" in html
    days = uptime_titles(html)
    assert len(days) == 30
    assert days[0] == "2026-02-09: no data"
    assert days[-3] == "2026-03-08: 100% online"
    # 16 h online, 6 h down: 16/22; the 2 h signed off count neither way.
    assert days[-2] == "2026-03-09: 72.7% online (down 6 h, signed off 2 h)"
    assert days[-1] == "2026-03-10: signed off all day"
    assert "87% online" in html  # 40 h online of 46 h online or down


def test_a_silence_the_watcher_has_not_recorded_yet_counts_as_down_from_its_deadline(alice_client, alice):
    island = make_island(alice, paired_at=PAIRED)
    change(island, at(10, 6), "offline", "online", "first_heartbeat")
    Island.objects.filter(pk=island.pk).update(
        status="online", last_heartbeat_at=at(10, 8, 59), offline_after=at(10, 9)
    )
    days = uptime_titles(page(alice_client, island))
    # 06:00-09:00 online, 09:00-12:00 down.
    assert days[-1] == "2026-03-10: 50% online (down 3 h)"


def test_jobs_and_earnings_per_day(alice_client, island):
    with time_machine.travel(at(9, 10), tick=False):
        done = give_job(island=island, job_id="job-done", credits=Decimal("2.5"))
        lost = give_job(island=island, job_id="job-lost")
        Job.objects.apply_status(island, done.job_id, "succeeded", None)
        Job.objects.apply_status(island, lost.job_id, "failed", "out of memory")
    html = page(alice_client, island)
    assert 'title="2026-03-09: 1 completed, 1 failed"' in html
    assert 'title="2026-03-09: 2.5 credits"' in html
    assert 'title="2026-03-08: 0 completed, 0 failed"' in html
    row = html.split('data-day="2026-03-09">', 2)[2].split("</tr>", 1)[0]
    cells = re.findall(r"<td>([^<]*)</td>", row)
    assert cells[:5] == ["2026-03-09", "72.7% online (down 6 h, signed off 2 h)", "1", "1", "2.5"]


def test_karma_at_the_end_of_each_day(alice_client, island):
    KarmaEvent.objects.adjust(island, Decimal(-3), "test", by=None, now=at(8, 10))
    KarmaEvent.objects.adjust(island, Decimal(5), "test", by=None, now=at(9, 10))
    history = island_history(island, NOW)
    by_day = {day.day.isoformat(): day.karma for day in history.days}
    assert by_day["2026-02-28"] is None  # before it was paired
    assert by_day["2026-03-01"] == Decimal(50)
    assert by_day["2026-03-08"] == Decimal(47)
    assert by_day["2026-03-09"] == by_day["2026-03-10"] == Decimal(52)
    assert 'aria-label="Karma over 30 days: 50 to 52 (of 100)"' in page(alice_client, island)


def test_the_history_costs_six_queries_however_long_it_is(island, django_assert_num_queries):
    with django_assert_num_queries(6):
        island_history(island, NOW)


def test_another_users_island_page_is_a_404(bob_client, island):
    assert bob_client.get(f"/settings/islands/{island.pk}").status_code == 404


def test_the_island_page_costs_the_same_queries_with_no_history_or_a_busy_month(
    alice, alice_client, island, django_assert_max_num_queries
):
    quiet = make_island(alice, host_id="alice-quiet-host", paired_at=PAIRED)
    with django_assert_max_num_queries(20) as empty:
        page(alice_client, quiet)
    for day in range(1, 11):
        with time_machine.travel(at(day, 10), tick=False):
            for n in range(5):
                job = give_job(island=island, job_id=f"job-{day}-{n}")
                Job.objects.apply_status(island, job.job_id, "succeeded" if n else "failed", None)
            KarmaEvent.objects.adjust(island, Decimal(1), "test", by=None, now=at(day, 11))
    with django_assert_max_num_queries(20) as busy:
        html = page(alice_client, island)
    assert 'title="2026-03-05: 4 completed, 1 failed"' in html
    print(f"/settings/islands/<id> queries: no history -> {len(empty)}, 50 jobs over 10 days -> {len(busy)}")
    assert len(empty) == len(busy)


def test_down_time_inside_a_maintenance_window_is_maintenance_not_down(alice_client, island):
    # The 6 h silence on the 9th (12:00-18:00); maintenance announced for 14:00-17:00.
    MaintenanceWindow.objects.create(
        island=island, starts_at=at(9, 14), ends_at=at(9, 17), announced_by="owner", created_at=at(9, 14)
    )
    days = uptime_titles(page(alice_client, island))
    # 16 h online, 3 h down: 16/19; 3 h maintenance and 2 h signed off count neither way.
    assert days[-2] == "2026-03-09: 84.2% online (down 3 h, signed off 2 h, maintenance 3 h)"
