"""Delivering claimed outbox rows: render the email for a notification and send it."""

import logging
from datetime import datetime

from django.conf import settings
from django.core.mail import EmailMessage
from django.template.loader import render_to_string
from django.utils import timezone

from notify.models import SEND_BATCH, Delivery, Notification

logger = logging.getLogger("notify.sender")


def render_email(notification: Notification) -> tuple[str, str]:
    """Subject and body. The template's first line is the subject."""
    text = render_to_string(
        f"notify/email/{notification.kind.replace('.', '_')}.txt",
        {"n": notification, "data": notification.data, "public_url": settings.PUBLIC_URL},
    )
    subject, _, body = text.strip().partition("\n")
    return subject.strip(), body.strip() + "\n"


def send_email(delivery: Delivery) -> None:
    subject, body = render_email(delivery.notification)
    domain = settings.PUBLIC_URL.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0] or "localhost"
    message = EmailMessage(
        subject,
        body,
        None,
        [delivery.target],
        # The same Message-ID on every try: a resend after a takeover is recognisably the same email.
        headers={"Message-ID": f"<{delivery.message_id}@{domain}>"},
    )
    message.send()


def deliver(delivery: Delivery, now: datetime | None = None) -> bool:
    """Send one claimed delivery and mark it. True when it went out."""
    try:
        if delivery.channel == Delivery.Channel.EMAIL:
            send_email(delivery)
        else:
            raise ValueError(f"no sender for channel {delivery.channel}")
    except Exception as exc:
        # Anything the mail server or the network throws: retried with backoff.
        logger.warning("event=delivery_failed delivery=%s error=%s", delivery.message_id, exc)
        delivery.mark_failed(timezone.now(), f"{type(exc).__name__}: {exc}")
        return False
    if not delivery.mark_sent(now or timezone.now()):
        logger.warning("event=delivery_claim_lost delivery=%s", delivery.message_id)
    return True


def send_due(now: datetime | None = None, limit: int = SEND_BATCH) -> int:
    """Claim and send what is due, one at a time. Returns how many were sent.

    One claim per send, so a lease only has to cover one send (a 10 s
    timeout), not a whole batch behind a slow mail server.
    """
    now = now or timezone.now()
    sent = 0
    for _ in range(limit):
        claimed = Delivery.objects.claim(now, limit=1)
        if not claimed:
            break
        sent += deliver(claimed[0])
    return sent
