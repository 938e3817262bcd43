from typing import Any

from django.apps import AppConfig
from django.contrib.auth.signals import user_logged_out
from django.http import HttpRequest


def end_mobile_sessions(sender: Any, request: HttpRequest, user: Any, **kwargs: Any) -> None:
    """Signing out ends the account's mobile pairing sessions (a code shown stops working)."""
    from pairing.models import MobilePairingSession

    if user is not None:
        MobilePairingSession.objects.end_for(user)


class PairingConfig(AppConfig):
    name = "pairing"

    def ready(self) -> None:
        user_logged_out.connect(end_mobile_sessions, dispatch_uid="pairing.end_mobile_sessions")
