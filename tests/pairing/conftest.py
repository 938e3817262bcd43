"""Builders for mobile pairing: sessions as /pair/mobile opens them, and phones."""

import json
from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import User

from islands.mobile import MobileDevice
from pairing.models import MobilePairingSession, OpenedSession
from simulator.phone import DEVICES

PHONE_HOST_ID = "8c1f4a2e-6b7d-4e0f-9a3b-2d5c7e9f1a4b"
# What the app reports about an iPhone and a Pixel: the simulator's phones.
IPHONE: dict[str, Any] = DEVICES["ios"]
PIXEL: dict[str, Any] = DEVICES["android"]
MOBILE_PAIR = "/api/v1/mobile/pair"


def device(**fields: Any) -> MobileDevice:
    return MobileDevice(**{**IPHONE, **fields})


@pytest.fixture
def open_session(db: None) -> Callable[..., OpenedSession]:
    """Open a mobile pairing session, as loading /pair/mobile does."""

    def build(owner: User, **kwargs: Any) -> OpenedSession:
        return MobilePairingSession.objects.open(owner, **kwargs)

    return build


def pair_phone(
    client: Any,
    *,
    host_id: str = PHONE_HOST_ID,
    phone: dict[str, Any] | None = None,
    code: str | None = None,
    secret: str | None = None,
    **extra: Any,
) -> Any:
    """POST to the mobile API as the app does, with a typed code or a scanned secret."""
    body: dict[str, Any] = {"host_id": host_id, "device": phone or IPHONE}
    if code is not None:
        body["code"] = code
    if secret is not None:
        body["secret"] = secret
    return client.post(MOBILE_PAIR, json.dumps(body), content_type="application/json", **extra)
