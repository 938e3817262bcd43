from dataclasses import dataclass
from typing import Any

from django.http import HttpRequest
from django.utils.functional import SimpleLazyObject

from notify.models import EmailAddress


@dataclass(frozen=True)
class AccountEmail:
    confirmed: EmailAddress | None
    pending: EmailAddress | None


def email_of(user: Any) -> AccountEmail:
    confirmed = pending = None
    for address in EmailAddress.objects.filter(user=user):
        if address.confirmed_at is not None:
            confirmed = address
        else:
            pending = address
    return AccountEmail(confirmed=confirmed, pending=pending)


def account_email(request: HttpRequest) -> dict[str, Any]:
    """The account's addresses, read only when a template asks (the nudge on /settings)."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    return {"account_email": SimpleLazyObject(lambda: email_of(user))}
