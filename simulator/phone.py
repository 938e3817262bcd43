"""The bundled simulator acting as a phone: `manage.py island --mobile QR_OR_CODE`.

Given the text of the QR code shown at /pair/mobile (or the 6-character code
beside it), it pairs through the mobile API the way the Archipelag.io app
does, and keeps the phone's host id and 30-day token in a state file of its
own. Standard library only, like the desktop simulator it borrows from.
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import parse_qs, urlsplit

from django.core.management.base import CommandError

from simulator.desktop import DEFAULT_STATE_PATH, Client, CoordinatorError, State

DEFAULT_PHONE_STATE_PATH = Path.home() / ".island" / "phone.json"
SCAN_PATH = "/pair/mobile/scan"

# What the app reports about the phone it runs on (docs/api.md).
DEVICES: dict[str, dict[str, Any]] = {
    "ios": {
        "platform": "ios",
        "model": "iPhone 15 Pro",
        "os_version": "18.1",
        "runtime": "coreml",
        "accelerator": "ane",
        "cpu_cores": 6,
        "ram_mb": 8192,
    },
    "android": {
        "platform": "android",
        "model": "Pixel 8",
        "os_version": "15",
        "runtime": "onnx",
        "accelerator": "nnapi",
        "cpu_cores": 9,
        "ram_mb": 8192,
    },
}


@dataclass(frozen=True)
class Scan:
    """What a phone learns from the QR code, or from a typed code and --url."""

    coordinator: str
    code: str | None = None
    secret: str | None = None


def parse_scan(text: str, default_url: str) -> Scan:
    """Read a QR payload (`<PUBLIC_URL>/pair/mobile/scan#code=...&secret=...`) or a typed code."""
    text = text.strip()
    if "://" not in text:
        return Scan(coordinator=default_url.rstrip("/"), code=text)
    parts = urlsplit(text)
    if parts.scheme not in {"http", "https"} or not parts.path.endswith(SCAN_PATH):
        raise ValueError(f"not an Archipelag.io pairing QR code: expected a URL ending in {SCAN_PATH}")
    fragment = parse_qs(parts.fragment)
    code, secret = fragment.get("code", [None])[0], fragment.get("secret", [None])[0]
    if not code and not secret:
        raise ValueError("the QR code carries neither a code nor a secret")
    base = f"{parts.scheme}://{parts.netloc}{parts.path.removesuffix(SCAN_PATH)}"
    return Scan(coordinator=base, code=code, secret=secret)


class PhoneSimulator:
    def __init__(
        self,
        scanned: str,
        url: str,
        platform: str = "ios",
        state_path: Path = DEFAULT_PHONE_STATE_PATH,
        out: TextIO = sys.stdout,
    ):
        self.scan = parse_scan(scanned, url)
        self.device = DEVICES[platform]
        self.state_path = state_path
        self.state = State.load(state_path)
        self.out = out

    def say(self, message: str) -> None:
        print(message, file=self.out, flush=True)

    def run(self) -> None:
        self.say(
            f"Phone simulator ({self.device['model']}), host {self.state.host_id}, state in {self.state_path}"
        )
        payload: dict[str, Any] = {"host_id": self.state.host_id, "device": self.device}
        # The app sends the scan secret when it has one: unlike a typed code it
        # cannot be guessed, so the service-wide budget for wrong codes never
        # stands in its way.
        if self.scan.secret:
            payload["secret"] = self.scan.secret
        else:
            payload["code"] = self.scan.code
        status, body = Client(self.scan.coordinator).post("/api/v1/mobile/pair", payload)
        if status != 201:
            raise CoordinatorError(status, body)
        self.state.paired = True
        self.state.island_id = body["island_id"]
        self.state.token = body["token"]
        self.state.coordinator = self.scan.coordinator
        self.state.save(self.state_path)
        self.say(f"Paired! This phone is now Island {body['island_id']} on account {body['account']}.")
        self.say(f"Its token is valid until {body['token_expires_at']}.")


def run_phone_command(options: dict[str, Any], out: TextIO) -> None:
    """`manage.py island --mobile ...`: the desktop state file stays the desktop's."""
    state_path = options["state"] if options["state"] != DEFAULT_STATE_PATH else DEFAULT_PHONE_STATE_PATH
    try:
        PhoneSimulator(
            options["mobile"], options["url"], platform=options["platform"], state_path=state_path, out=out
        ).run()
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    except CoordinatorError as exc:
        raise CommandError(f"The coordinator refused: {exc} (HTTP {exc.status})") from exc
    except OSError as exc:
        raise CommandError(f"Cannot reach the coordinator: {exc}") from exc
