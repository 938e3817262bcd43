"""The new-Island notice: hardware, when, from where, and a "This wasn't me" link that asks first."""

from datetime import timedelta

import pytest
import time_machine
from django.test import Client

from islands.models import Island
from notify.models import Notification
from notify.sender import send_due
from tests.notify.conftest import body


def not_me_path(message):
    line = next(line for line in body(message).splitlines() if line.startswith("This wasn't me:"))
    return line.split("http://127.0.0.1:8000", 1)[1]


@pytest.fixture
def linked(issue_code, alice, mailbox):
    issued = issue_code(ip="203.0.113.7")
    island = issued.row.redeem(alice)
    assert send_due() == 1
    [message] = mailbox.to("alice@example.org")
    return island, message


def test_a_new_island_is_announced_with_its_hardware_time_and_address(linked):
    island, message = linked
    assert message["Subject"] == "A new Island was linked to your account"
    text = body(message)
    assert "RTX 4090 24 GB · 16 CPU cores · 64 GB RAM" in text
    assert f"{island.paired_at:%Y-%m-%d %H:%M} UTC" in text
    assert "From the address: 203.0.113.7" in text
    assert "/islands/not-me/" in text


def test_opening_the_link_removes_nothing_and_the_button_removes_it(linked):
    island, message = linked
    path = not_me_path(message)
    client = Client(enforce_csrf_checks=True)
    page = client.get(path)
    assert page.status_code == 200
    assert "Remove this Island?" in page.content.decode()
    # A mail scanner's GET (or HEAD) removes nothing.
    client.head(path)
    island.refresh_from_db()
    assert island.removed_at is None

    token = page.cookies["csrftoken"].value
    done = client.post(path, {"csrfmiddlewaretoken": token})
    assert done.status_code == 200 and "Island removed" in done.content.decode()
    island.refresh_from_db()
    assert island.removed_at is not None and island.token_hash is None
    # The link is spent: the Island is no longer linked.
    assert client.get(path).status_code == 400


def test_the_link_expires_after_a_week(linked):
    island, message = linked
    with time_machine.travel(island.paired_at + timedelta(days=8)):
        response = Client().post(not_me_path(message))
    assert response.status_code in (400, 403)
    island.refresh_from_db()
    assert island.removed_at is None


def test_a_forged_link_is_refused(db):
    assert Client().get("/islands/not-me/forged/").status_code == 400


def test_a_switched_off_notice_writes_no_delivery(issue_code, alice, alice_client):
    alice_client.post("/settings/notifications", {"offline_grace_minutes": "5", "offline": "on"})
    issue_code().row.redeem(alice)
    notice = Notification.objects.get(kind="island.linked")
    assert not notice.deliveries.exists()


def test_an_island_keys_first_registration_is_announced_without_an_address(alice, mailbox):
    from islands.agent import Capabilities
    from islands.models import IslandKey

    [issued] = IslandKey.objects.issue(alice)
    island = IslandKey.objects.link_host(issued.key.host_id, Capabilities(gpu_model="RTX 3060"), "0.5.0")
    assert isinstance(island, Island)
    send_due()
    text = body(mailbox.to("alice@example.org")[0])
    assert "RTX 3060" in text and "From the address" not in text
