"""Delivering claimed outbox rows: render the email for a notification and send it."""

import logging
import time
from datetime import datetime
from typing import Any

from django.conf import settings
from django.core.mail import EmailMessage
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone

from notify import webhooks
from notify.alerts import absolute, alert_still_due
from notify.models import SEND_BATCH, Delivery, Notification
from notify.unsubscribe import unsubscribe_url

logger = logging.getLogger("notify.sender")


def _times(data: dict[str, Any]) -> dict[str, datetime]:
    """The data's ISO 8601 moments as datetimes, for the templates' date filters."""
    moments = {}
    for name, value in data.items():
        if isinstance(value, str) and value.endswith("Z") and "T" in value:
            try:
                moments[name] = datetime.fromisoformat(value)
            except ValueError:
                continue
    return moments


def duration_words(seconds: int) -> str:
    """3725 -> "1 h 2 min"; under a minute, in seconds."""
    if seconds < 60:
        return f"{seconds} s"
    hours, minutes = divmod(seconds // 60, 60)
    if not hours:
        return f"{minutes} min"
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def render_email(notification: Notification) -> tuple[str, str]:
    """Subject and body: the first line of the template is the subject; an unsubscribe link ends it."""
    data = notification.data
    text = render_to_string(
        f"notify/email/{notification.kind.replace('.', '_')}.txt",
        {
            "n": notification,
            "data": data,
            "t": _times(data),
            "away": duration_words(int(data.get("away_seconds", 0))),
            "public_url": settings.PUBLIC_URL,
            "reference_url": absolute(reverse("karma:reference")),
            "settings_url": absolute(reverse("notify:settings")),
        },
    )
    subject, _, body = text.strip().partition("\n")
    footer = (
        f"\n--\nWhat you are told, and where: {absolute(reverse('notify:settings'))}\n"
        f"Unsubscribe from these emails: {unsubscribe_url(notification)}\n"
    )
    return subject.strip(), body.strip() + "\n" + footer


def send_email(delivery: Delivery) -> None:
    subject, body = render_email(delivery.notification)
    domain = settings.PUBLIC_URL.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0] or "localhost"
    message = EmailMessage(
        subject,
        body,
        None,
        [delivery.target],
        headers={
            # The same Message-ID on every try: a resend after a takeover is recognisably the same email.
            "Message-ID": f"<{delivery.message_id}@{domain}>",
            # One-click unsubscribe (RFC 8058): mail clients POST to the link.
            "List-Unsubscribe": f"<{unsubscribe_url(delivery.notification)}>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        },
    )
    message.send()


def send_webhook(delivery: Delivery) -> None:
    """POST the signed event. The webhook-id is the delivery's: the same on every try."""
    endpoint = delivery.endpoint
    if endpoint is None:
        raise ValueError("a webhook delivery without its endpoint")
    notification = delivery.notification
    body = webhooks.payload(notification.kind, notification.created_at, notification.data)
    # Signed at send time: receivers refuse timestamps more than minutes off their clock.
    timestamp = int(time.time())
    headers = webhooks.signed_headers(endpoint.secret(), delivery.message_id, timestamp, body)
    webhooks.post(endpoint.url, body, headers)


def deliver(delivery: Delivery, now: datetime | None = None) -> bool:
    """Send one claimed delivery and mark it. True when it went out."""
    send, later, why = alert_still_due(delivery.notification, now or timezone.now())
    if not send:
        if later is not None:
            delivery.postpone(later)
        else:
            delivery.mark_skipped(now or timezone.now(), why)
        return False
    if delivery.endpoint is not None and delivery.endpoint.paused:
        delivery.mark_skipped(now or timezone.now(), "the endpoint is paused")
        return False
    try:
        if delivery.channel == Delivery.Channel.EMAIL:
            send_email(delivery)
        elif delivery.channel == Delivery.Channel.WEBHOOK:
            send_webhook(delivery)
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
        sent += deliver(claimed[0], now)
    return sent
