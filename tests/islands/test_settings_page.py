import re
from datetime import timedelta
from decimal import Decimal

import pytest
import time_machine

from islands.models import Island
from tests.islands.conftest import T0, beat, make_island


def test_settings_requires_login(client, db):
    response = client.get("/settings")
    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/?next=/settings"


def test_a_new_user_is_told_how_to_pair(alice_client):
    html = alice_client.get("/settings").content.decode()
    assert "No Islands yet" in html
    assert 'href="/pair"' in html


def test_your_islands_lists_only_your_active_islands(alice, bob, alice_client):
    mine = Island.objects.create(
        owner=alice,
        host_id="alice-host-0001",
        gpu_model="RTX 4090",
        gpu_vram_mb=24576,
        cpu_cores=16,
        ram_mb=65536,
    )
    Island.objects.create(owner=bob, host_id="bob-host-00001", name="Bob's box")
    gone = Island.objects.create(owner=alice, host_id="alice-host-0002", name="Old box")
    gone.remove()
    html = alice_client.get("/settings").content.decode()
    assert "Your Islands" in html
    assert mine.name == "RTX 4090 (alice-ho)"
    assert mine.name in html
    assert "alice-host-0001" in html
    assert "RTX 4090 24 GB · 16 CPU cores · 64 GB RAM" in html
    assert "Bob&#x27;s box" not in html and "bob-host" not in html
    assert "Old box" not in html


def test_refresh_with_htmx_renders_only_the_list(alice, alice_client):
    Island.objects.create(owner=alice, host_id="alice-host-0001")
    response = alice_client.get("/settings", headers={"HX-Request": "true"})
    html = response.content.decode()
    assert "<html" not in html
    assert html.strip().startswith('<div id="island-list" ')
    assert "alice-host-0001" in html


def test_removing_an_island_revokes_its_token_at_once(alice, alice_client):
    island = Island.objects.create(owner=alice, host_id="alice-host-0001")
    token = island.issue_token()
    response = alice_client.post(f"/settings/islands/{island.pk}/remove", follow=True)
    assert "was removed" in response.content.decode()
    island.refresh_from_db()
    assert island.removed_at is not None
    assert Island.objects.authenticate(token) is None
    assert "alice-host-0001" not in alice_client.get("/settings").content.decode()


def test_nobody_can_remove_another_users_island(alice, bob_client):
    island = Island.objects.create(owner=alice, host_id="alice-host-0001")
    assert bob_client.post(f"/settings/islands/{island.pk}/remove").status_code == 404
    assert bob_client.get(f"/settings/islands/{island.pk}/remove").status_code == 405
    island.refresh_from_db()
    assert island.removed_at is None


# --- The cards ------------------------------------------------------------------------


def card(html, island):
    """The HTML of one Island's card."""
    start = html.index(f'data-island="{island.pk}"')
    return html[start : html.index("</article>", start)]


def field(card_html, label):
    """The text of a card's <dd> after <dt>label</dt>, tags stripped."""
    match = re.search(rf"<dt>{re.escape(label)}</dt>\s*<dd([^>]*)>(.*?)</dd>", card_html, re.S)
    assert match, f"no {label!r} field"
    return match.group(1), " ".join(re.sub(r"<[^>]+>", " ", match.group(2)).split())


def status_of(card_html):
    """The card's badge and the line under it saying what the status means ("" if none)."""
    badge = re.search(r'<span class="status [^"]*" data-status="[^"]*">(.*?)</span>', card_html, re.S)
    assert badge, "no status badge"
    line = re.search(r'<p class="status-text[^"]*">(.*?)</p>', card_html, re.S)
    text = " ".join(re.sub(r"<[^>]+>", " ", line.group(1)).split()) if line else ""
    return badge.group(1), text


def page_at(client, when, **headers):
    with time_machine.travel(when, tick=False):
        return client.get("/settings", headers=headers).content.decode()


def test_a_card_shows_every_field_of_the_seed_table(alice, alice_client):
    island = make_island(alice, jobs_completed=42, jobs_failed=3, earnings=Decimal("1234.5"))
    beat(island, T0)
    html = card(page_at(alice_client, T0 + timedelta(seconds=12)), island)
    assert 'data-status="online">Online</span>' in html
    assert "status-text" not in html  # online needs no explaining
    assert field(html, "Hardware")[1] == "RTX 4090 24 GB · 16 CPU cores · 64 GB RAM"
    assert field(html, "Jobs completed") == (' class="count good"', "42")
    assert field(html, "Jobs failed") == (' class="count bad"', "3")
    assert field(html, "Earnings")[1] == "1,234.5 credits"
    assert field(html, "Last heartbeat")[1] == "12 s ago"
    assert 'title="2026-03-01 12:00:00 UTC"' in html
    assert 'datetime="2026-03-01T12:00:00+00:00"' in html


def test_zero_jobs_are_not_coloured_as_good_or_bad(alice, alice_client):
    island = make_island(alice)
    html = card(page_at(alice_client, T0), island)
    assert field(html, "Jobs completed") == (' class="count"', "0")
    assert field(html, "Jobs failed") == (' class="count"', "0")


def test_a_card_turns_offline_at_the_threshold(alice, alice_client):
    island = make_island(alice)
    beat(island, T0)
    online = card(page_at(alice_client, T0 + timedelta(seconds=44.9)), island)
    offline = card(page_at(alice_client, T0 + timedelta(seconds=45.1)), island)
    assert status_of(online) == ("Online", "")
    assert status_of(offline)[0] == "Down"
    assert status_of(offline)[1].startswith("Without signing off")
    assert field(offline, "Last heartbeat")[1] == "45 s ago"


def test_a_signed_off_island_says_so(alice, alice_client):
    island = make_island(alice)
    beat(island, T0)
    beat(island, T0 + timedelta(seconds=1), status="offline")
    html = card(page_at(alice_client, T0 + timedelta(seconds=2)), island)
    assert status_of(html) == ("Signed off", "Offline, no karma charge")
    assert 'data-status="signed_off"' in html


def test_a_new_island_waits_for_its_first_heartbeat(alice, alice_client):
    island = make_island(alice)
    html = card(page_at(alice_client, T0), island)
    assert status_of(html) == ("Waiting for its first heartbeat", "Linked: start the Island software")
    assert 'data-status="new"' in html
    assert "Offline" not in html and "Down" not in html
    assert field(html, "Last heartbeat")[1] == "none yet"
    assert field(html, "Earnings")[1] == "0 credits"
    assert field(html, "Jobs completed")[1] == "0"


def test_a_suspended_island_is_shown_as_suspended(alice, alice_client):
    island = make_island(alice, suspended_at=T0)
    beat(island, T0)
    assert status_of(card(page_at(alice_client, T0), island)) == (
        "Suspended",
        "By an administrator: gets no jobs",
    )


def test_a_phone_card_shows_its_model_and_runtime(alice, alice_client):
    phone = make_island(
        alice,
        "phone-host-0001",
        kind=Island.Kind.MOBILE,
        gpu_model="",
        cpu_cores=None,
        device_model="Pixel 9",
        runtime="onnx",
        accelerator="nnapi",
        ram_mb=12288,
    )
    assert (
        field(card(page_at(alice_client, T0), phone), "Hardware")[1] == "Pixel 9 · onnx / nnapi · 12 GB RAM"
    )


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0, "0 s ago"),
        (59, "59 s ago"),
        (60, "1 min ago"),
        (3599, "59 min ago"),
        (7200, "2 h ago"),
        (86400, "1 day ago"),
        (3 * 86400, "3 days ago"),
    ],
)
def test_last_heartbeat_reads_naturally(alice, alice_client, seconds, shown):
    island = make_island(alice)
    beat(island, T0)
    assert (
        field(card(page_at(alice_client, T0 + timedelta(seconds=seconds)), island), "Last heartbeat")[1]
        == shown
    )


def test_refresh_is_a_plain_link_without_javascript(alice_client):
    html = alice_client.get("/settings").content.decode()
    assert '<a class="button" href="/settings"' in html
    assert 'hx-get="/settings" hx-target="#island-list"' in html


def test_refresh_with_htmx_shows_the_status_now(alice, alice_client):
    island = make_island(alice)
    beat(island, T0)
    fragment = page_at(alice_client, T0 + timedelta(seconds=50), **{"HX-Request": "true"})
    assert fragment.strip().startswith('<div id="island-list" ')
    assert status_of(card(fragment, island))[0] == "Down"


# --- Rename -------------------------------------------------------------------------------


def test_renaming_an_island(alice, alice_client):
    island = make_island(alice)
    response = alice_client.post(
        f"/settings/islands/{island.pk}/rename", {"name": "  Garage rig  "}, follow=True
    )
    assert "Island renamed to “Garage rig”." in response.content.decode()
    island.refresh_from_db()
    assert island.name == "Garage rig"


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("", "Give the Island a name."),
        ("   ", "Give the Island a name."),
        ("x" * 101, "Keep the name to 100 characters (it has 101)."),
    ],
)
def test_a_bad_name_is_refused_with_the_reason_shown(alice, alice_client, name, error):
    island = make_island(alice, name="Garage rig")
    response = alice_client.post(f"/settings/islands/{island.pk}/rename", {"name": name})
    assert response.status_code == 400
    html = card(response.content.decode(), island)
    assert error in html
    assert '<details class="rename" open>' in html
    island.refresh_from_db()
    assert island.name == "Garage rig"


def test_nobody_can_rename_another_users_island(alice, bob_client):
    island = make_island(alice, name="Garage rig")
    assert bob_client.post(f"/settings/islands/{island.pk}/rename", {"name": "Mine now"}).status_code == 404
    assert bob_client.get(f"/settings/islands/{island.pk}/rename").status_code == 405
    island.refresh_from_db()
    assert island.name == "Garage rig"


def test_after_removal_the_islands_next_call_gets_401(alice, alice_client, client):
    island = make_island(alice)
    token = island.issue_token()
    auth = {"Authorization": f"Bearer {token}"}
    assert (
        client.post(
            "/api/v1/islands/heartbeat", {}, content_type="application/json", headers=auth
        ).status_code
        == 200
    )
    alice_client.post(f"/settings/islands/{island.pk}/remove")
    assert (
        client.post(
            "/api/v1/islands/heartbeat", {}, content_type="application/json", headers=auth
        ).status_code
        == 401
    )
    assert (
        client.post(
            "/api/v1/islands/jobs/poll", {}, content_type="application/json", headers=auth
        ).status_code
        == 401
    )


def test_renaming_does_not_write_back_a_stale_heartbeat(alice, alice_client, monkeypatch):
    """The rename request loads the Island, a heartbeat lands, then the rename saves."""
    from django.utils import timezone

    from islands import views

    island = Island.objects.create(owner=alice, host_id="alice-host-0001")
    loaded = views._island_for
    beat_at = timezone.now()

    def load_then_heartbeat(request, pk):
        stale = loaded(request, pk)
        Island.objects.filter(pk=pk).update(
            last_heartbeat_at=beat_at, agent_version="9.9.9", jobs_completed=3
        )
        return stale

    monkeypatch.setattr(views, "_island_for", load_then_heartbeat)
    response = alice_client.post(f"/settings/islands/{island.pk}/rename", {"name": "Garage box"})
    assert response.status_code == 302
    island.refresh_from_db()
    assert island.name == "Garage box"
    assert island.last_heartbeat_at == beat_at
    assert island.agent_version == "9.9.9"
    assert island.jobs_completed == 3
