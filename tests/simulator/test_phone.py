"""`manage.py island --mobile`: the bundled simulator acting as the phone app."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from islands.models import Island
from pairing.models import MobilePairingSession
from simulator.phone import PhoneSimulator, Scan, parse_scan

BASE_DIR = Path(__file__).resolve().parent.parent.parent


def test_parse_scan_reads_the_qr_payload_and_a_typed_code():
    payload = "https://islands.example.org/pair/mobile/scan#code=A3X9K2&secret=abc_DEF-123"
    assert parse_scan(payload, "http://ignored") == Scan(
        "https://islands.example.org", "A3X9K2", "abc_DEF-123"
    )
    behind_a_prefix = "https://example.org/islands/pair/mobile/scan#secret=s3cret"
    assert parse_scan(behind_a_prefix, "http://ignored") == Scan(
        "https://example.org/islands", None, "s3cret"
    )
    assert parse_scan(" a3x-9k2 ", "http://127.0.0.1:8000/") == Scan("http://127.0.0.1:8000", "a3x-9k2", None)
    for bad in (
        "https://evil.example/login#secret=x",
        "ftp://x/pair/mobile/scan#secret=x",
        "https://x/pair/mobile/scan",
    ):
        with pytest.raises(ValueError, match="QR code"):
            parse_scan(bad, "http://ignored")


def test_the_phone_pairs_with_the_qr_payload_and_keeps_its_identity(daphne_server, alice, tmp_path, settings):
    settings.PUBLIC_URL = daphne_server.url  # as daphne's own PUBLIC_URL is
    opened = MobilePairingSession.objects.open(alice)
    state_path = tmp_path / "phone.json"
    out = io.StringIO()
    PhoneSimulator(opened.scan_url, "http://unused", platform="android", state_path=state_path, out=out).run()

    island = Island.objects.get()
    assert (island.owner, island.kind, island.platform, island.runtime) == (
        alice,
        "mobile",
        "android",
        "onnx",
    )
    assert f"Paired! This phone is now Island {island.pk} on account a***e." in out.getvalue()
    assert MobilePairingSession.objects.get().redeemed_via == "secret"
    state = json.loads(state_path.read_text())
    assert state["host_id"] == island.host_id
    assert Island.objects.authenticate(state["token"]) == island
    assert state_path.stat().st_mode & 0o777 == 0o600

    # Pairing again from the same phone keeps the Island and replaces the token.
    again = MobilePairingSession.objects.open(alice)
    PhoneSimulator(again.scan_url, "http://unused", platform="android", state_path=state_path, out=out).run()
    assert Island.objects.get().pk == island.pk
    assert Island.objects.authenticate(state["token"]) is None


def test_the_island_command_pairs_a_phone_with_a_typed_code(daphne_server, alice, tmp_path):
    opened = MobilePairingSession.objects.open(alice)
    result = subprocess.run(
        [
            sys.executable,
            "manage.py",
            "island",
            "--url",
            daphne_server.url,
            "--state",
            str(tmp_path / "phone.json"),
            "--mobile",
            opened.code.lower(),
        ],
        cwd=BASE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    island = Island.objects.get()
    assert f"Paired! This phone is now Island {island.pk} on account a***e." in result.stdout
    assert (island.platform, island.device_model, island.runtime) == ("ios", "iPhone 15 Pro", "coreml")
    assert MobilePairingSession.objects.get().redeemed_via == "code"


def test_a_refused_code_is_a_command_error(daphne_server, db, tmp_path):
    with pytest.raises(CommandError, match=r"unknown or already used code \(HTTP 401\)"):
        call_command(
            "island", "--url", daphne_server.url, "--state", str(tmp_path / "p.json"), "--mobile", "ZZZZZZ"
        )
    with pytest.raises(CommandError, match=r"not an Archipelag\.io pairing QR code"):
        call_command("island", "--mobile", "https://example.org/whatever")
