"""The account emails: short, plain text, links on PUBLIC_URL."""

import logging

from django.conf import settings
from django.core.mail import send_mail
from django.template.loader import render_to_string
from django.urls import reverse

from notify.models import EmailAddress

logger = logging.getLogger("notify.emails")


def absolute(path: str) -> str:
    """A full URL on PUBLIC_URL: what the recipient's mail client can open."""
    return f"{settings.PUBLIC_URL}{path}"


def send_confirmation(address: EmailAddress) -> bool:
    """Send the confirmation link; False (logged) when the mail server refuses or is away."""
    link = absolute(reverse("notify:confirm", args=[address.confirmation_token()]))
    context = {
        "link": link,
        "username": address.user.get_username(),
        "days": settings.EMAIL_CONFIRMATION_DAYS,
    }
    try:
        send_mail(
            "Confirm your email address for Archipelag.io",
            render_to_string("notify/email/confirm.txt", context),
            None,
            [address.email],
        )
    except OSError:
        # SMTP errors are OSErrors. The account exists; the host can resend from /settings.
        logger.exception("event=confirmation_email_failed address_id=%s", address.pk)
        return False
    return True
