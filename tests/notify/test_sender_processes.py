"""Two `send_notifications` processes, and one SIGKILLed mid-batch, on PostgreSQL.

Each delivery is claimed by one conditional UPDATE, so two senders never
both send it; a sender killed between send and mark leaves its claim to
expire, and the next sender sends it again with the same Message-ID (email
is at least once): never a second notification, never a lost one.
"""

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

from notify.models import Delivery, Notification
from tests.conftest import BASE_DIR, PASSWORD, _test_database_url

MESSAGES = 60


def _sender(mailbox, tmp_path, name: str, lease: int = 60) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **mailbox.env(),
        "DATABASE_URL": _test_database_url(),
        "DJANGO_SETTINGS_MODULE": "archipelag.settings",
        "NOTIFY_CLAIM_LEASE": str(lease),
        "WEBHOOKS_ALLOW_PRIVATE": "1",
    }
    log = (tmp_path / f"{name}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "manage.py", "send_notifications", "--interval", "0.2"],
        cwd=BASE_DIR,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _wait(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("timed out")
        time.sleep(0.1)


def _record(n: int) -> set[str]:
    carol = User.objects.create_user("carol", email="carol@example.com", password=PASSWORD)
    now = timezone.now()
    for i in range(n):
        Notification.objects.record(carol, Notification.Kind.TEST, f"test:{i}", {}, now)
    return {f"<{mid}@127.0.0.1>" for mid in Delivery.objects.values_list("message_id", flat=True)}


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=20)


@pytest.mark.postgres
def test_two_senders_send_each_email_once(postgres, transactional_db, mailbox, tmp_path):
    expected = _record(MESSAGES)
    senders = [_sender(mailbox, tmp_path, "a"), _sender(mailbox, tmp_path, "b")]
    try:
        _wait(lambda: Delivery.objects.filter(status="sent").count() == MESSAGES)
    finally:
        for process in senders:
            _stop(process)
    received = Counter(mailbox.ids())
    assert set(received) == expected
    assert max(received.values()) == 1, [mid for mid, n in received.items() if n > 1]
    assert Notification.objects.count() == MESSAGES


@pytest.mark.postgres
def test_a_sender_killed_mid_batch_loses_nothing_and_resends_with_the_same_id(
    postgres, transactional_db, mailbox, tmp_path
):
    expected = _record(MESSAGES)
    # A slow mail server: the kill lands between a send and its mark.
    mailbox.delay = 0.05
    first = _sender(mailbox, tmp_path, "first", lease=2)
    _wait(lambda: len(mailbox.ids()) >= 10)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    received_before = len(mailbox.ids())
    in_flight = set(
        Delivery.objects.filter(status="pending", claim__isnull=False).values_list("message_id", flat=True)
    )
    sent_before = Delivery.objects.filter(status="sent").count()
    print(f"killed with {len(in_flight)} claimed, {sent_before} sent, {received_before} received")
    assert sent_before < MESSAGES
    # Sent but not marked: at most the one being sent when the kill came.
    assert received_before - sent_before <= 1
    second = _sender(mailbox, tmp_path, "second", lease=2)
    try:
        _wait(lambda: Delivery.objects.filter(status="sent").count() == MESSAGES)
    finally:
        _stop(second)
    received = Counter(mailbox.ids())
    assert set(received) == expected
    twice = {mid for mid, n in received.items() if n > 1}
    # Only a delivery claimed at the kill can arrive twice, with its one Message-ID.
    assert twice <= {f"<{mid}@127.0.0.1>" for mid in in_flight}
    assert all(n <= 2 for n in received.values())
    assert Notification.objects.count() == MESSAGES
    assert Delivery.objects.count() == MESSAGES


@pytest.mark.postgres
def test_a_sender_killed_mid_batch_delivers_each_webhook_event_once_by_its_id(
    postgres, transactional_db, receiver, tmp_path, mailbox
):
    """Receivers de-duplicate on webhook-id: a resend after the kill carries the same one, signed."""
    from standardwebhooks.webhooks import Webhook

    from notify.models import WebhookEndpoint

    dave = User.objects.create_user("dave", password=PASSWORD)  # no address: webhooks only
    _, secret = WebhookEndpoint.objects.add(dave, receiver.url, ["island.linked"], timezone.now())
    now = timezone.now()
    for i in range(MESSAGES):
        Notification.objects.record(dave, Notification.Kind.LINKED, f"linked:{i}", {"n": i}, now)
    expected = set(Delivery.objects.values_list("message_id", flat=True))
    assert len(expected) == MESSAGES
    receiver.delay = 0.05
    first = _sender(mailbox, tmp_path, "first", lease=2)
    _wait(lambda: len(receiver.requests) >= 10)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    in_flight = set(
        Delivery.objects.filter(status="pending", claim__isnull=False).values_list("message_id", flat=True)
    )
    assert Delivery.objects.filter(status="sent").count() < MESSAGES
    second = _sender(mailbox, tmp_path, "second", lease=2)
    try:
        _wait(lambda: Delivery.objects.filter(status="sent").count() == MESSAGES)
    finally:
        _stop(second)
    received = Counter(receiver.ids())
    assert set(received) == expected
    assert {mid for mid, n in received.items() if n > 1} <= in_flight
    # What a de-duplicating receiver keeps: each event once, each one signed.
    events = {}
    for headers, data, _ in receiver.requests:
        events[headers["webhook-id"]] = Webhook(secret).verify(data, headers)
    assert sorted(event["data"]["n"] for event in events.values()) == list(range(MESSAGES))
    assert Notification.objects.count() == MESSAGES
