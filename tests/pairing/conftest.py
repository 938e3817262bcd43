"""Builders for mobile pairing: sessions as /pair/mobile opens them, and phones."""

import json
from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import User

from islands.mobile import MobileDevice
from pairing.models import MobilePairingSession, OpenedSession

PHONE_HOST_ID = "8c1f4a2e-6b7d-4e0f-9a3b-2d5c7e9f1a4b"
IPHONE: dict[str, Any] = {
    "platform": "ios",
    "model": "iPhone 15 Pro",
    "os_version": "18.1",
    "runtime": "coreml",
    "accelerator": "ane",
    "cpu_cores": 6,
    "ram_mb": 8192,
}
PIXEL: dict[str, Any] = {
    "platform": "android",
    "model": "Pixel 8",
    "os_version": "15",
    "runtime": "onnx",
    "accelerator": "nnapi",
    "cpu_cores": 9,
    "ram_mb": 8192,
}
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
