from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

from notify.models import MAX_ATTEMPTS, Delivery, Notification
from notify.sender import send_due
from tests.conftest import PASSWORD, _free_port
from tests.notify.conftest import body


@pytest.fixture
def carol(db):
    return User.objects.create_user("carol", email="carol@example.com", password=PASSWORD)


def test_a_notification_is_recorded_once_per_key_with_an_email_delivery(carol):
    now = timezone.now()
    first = Notification.objects.record(carol, Notification.Kind.TEST, "test:1", {}, now)
    again = Notification.objects.record(carol, Notification.Kind.TEST, "test:1", {}, now)
    assert first is not None and again is None
    assert Notification.objects.count() == 1
    delivery = Delivery.objects.get()
    assert (delivery.channel, delivery.target, delivery.status) == ("email", "carol@example.com", "pending")


def test_no_confirmed_address_means_no_email(db):
    dave = User.objects.create_user("dave", password=PASSWORD)
    Notification.objects.record(dave, Notification.Kind.TEST, "test:2", {}, timezone.now())
    assert Notification.objects.count() == 1
    assert Delivery.objects.count() == 0


def test_the_sender_delivers_over_smtp_and_marks_sent_once(carol, mailbox):
    Notification.objects.record(carol, Notification.Kind.TEST, "test:3", {}, timezone.now())
    assert send_due() == 1
    assert send_due() == 0
    [message] = mailbox.to("carol@example.com")
    assert message["Subject"] == "Test notification from Archipelag.io"
    assert "email alerts reach you" in body(message)
    delivery = Delivery.objects.get()
    assert delivery.status == "sent" and delivery.sent_at is not None
    assert message["Message-ID"] == f"<{delivery.message_id}@127.0.0.1>"


def test_a_mail_server_away_is_retried_with_backoff_then_given_up(carol, settings, time_machine):
    settings.MAILERS = {
        "default": {
            "BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "OPTIONS": {"host": "127.0.0.1", "port": _free_port(), "timeout": 2},
        }
    }
    start = timezone.now()
    time_machine.move_to(start, tick=False)
    Notification.objects.record(carol, Notification.Kind.TEST, "test:4", {}, start)
    assert send_due() == 0
    delivery = Delivery.objects.get()
    assert delivery.status == "pending" and delivery.attempts == 1
    assert delivery.next_attempt_at == start + timedelta(minutes=1)
    assert "ConnectionRefusedError" in delivery.last_error
    # Not before its time.
    assert send_due(start + timedelta(seconds=59)) == 0
    assert Delivery.objects.get().attempts == 1
    waited = timedelta(0)
    for attempt in range(2, MAX_ATTEMPTS + 1):
        waited += timedelta(minutes=2 ** (attempt - 2))
        time_machine.move_to(start + waited, tick=False)
        send_due()
        assert Delivery.objects.get().attempts == attempt
    delivery = Delivery.objects.get()
    assert delivery.status == "failed"
    # About an hour of retries (1 + 2 + ... + 32 minutes) before giving up.
    assert waited == timedelta(minutes=63)


def test_a_failure_then_success_sends_once(carol, mailbox, settings, time_machine):
    good = settings.MAILERS
    settings.MAILERS = {
        "default": {
            "BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "OPTIONS": {"host": "127.0.0.1", "port": _free_port(), "timeout": 2},
        }
    }
    start = timezone.now()
    time_machine.move_to(start, tick=False)
    Notification.objects.record(carol, Notification.Kind.TEST, "test:5", {}, start)
    send_due()
    settings.MAILERS = good
    time_machine.move_to(start + timedelta(minutes=1), tick=False)
    assert send_due() == 1
    assert len(mailbox.to("carol@example.com")) == 1
    delivery = Delivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.last_error) == ("sent", 2, "")
