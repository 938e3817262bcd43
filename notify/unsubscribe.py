"""Unsubscribe links: every email carries one that turns its kind off, signed, no sign-in needed."""

from django.core import signing
from django.urls import reverse

from notify.alerts import absolute
from notify.models import KIND_SWITCHES, Notification

SALT = "notify.unsubscribe"
# The token names the account and the kind; "all" turns every switch off.
ALL = "all"


def unsubscribe_url(notification: Notification) -> str:
    kind = notification.kind if notification.kind in KIND_SWITCHES else ALL
    token = signing.dumps({"u": notification.user_id, "k": kind}, salt=SALT)
    return absolute(reverse("notify:unsubscribe", args=[token]))


def read_token(token: str) -> tuple[int, str] | None:
    """The account and kind a link names; links do not expire (old emails keep working)."""
    try:
        payload = signing.loads(token, salt=SALT)
        user_pk, kind = int(payload["u"]), str(payload["k"])
    except (signing.BadSignature, KeyError, TypeError, ValueError):
        return None
    if kind != ALL and kind not in KIND_SWITCHES:
        return None
    return user_pk, kind
