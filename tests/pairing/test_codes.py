import re
from collections import Counter
from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from pairing.codes import ALPHABET, CODE_LENGTH, MalformedCode, generate_code, hash_code, normalize_code
from pairing.models import CODE_TTL, CodeExpired, PairingCode


def test_alphabet_has_32_symbols_without_ambiguous_letters():
    assert len(ALPHABET) == 32
    assert len(set(ALPHABET)) == 32
    for letter in "ILOU":
        assert letter not in ALPHABET


def test_generated_codes_are_six_symbols_of_the_alphabet():
    codes = [generate_code() for _ in range(2000)]
    assert all(re.fullmatch(f"[{ALPHABET}]{{{CODE_LENGTH}}}", code) for code in codes)
    # 12,000 symbols over 32 letters: every symbol shows up, none dominates.
    counts = Counter("".join(codes))
    assert set(counts) == set(ALPHABET)
    assert max(counts.values()) < 2 * min(counts.values())


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("A3X9K2", "A3X9K2"),
        ("a3x9k2", "A3X9K2"),
        ("a3x-9k2", "A3X9K2"),
        (" a3x 9k2 ", "A3X9K2"),
        ("A3X-9K-2", "A3X9K2"),
        ("OOOOOO", "000000"),
        ("oIlL10", "011110"),
    ],
)
def test_typed_codes_are_normalised(typed, expected):
    assert normalize_code(typed) == expected


@pytest.mark.parametrize(
    "typed", ["", "   ", "A3X9K", "A3X9K2Z", "A3X9KU", "A3X9K!", "A3X_9K2", "Ä3X9K2", "x" * 65]
)
def test_malformed_codes_are_refused(typed):
    with pytest.raises(MalformedCode):
        normalize_code(typed)


def test_codes_are_stored_only_as_a_keyed_hash(issue_code):
    issued = issue_code()
    row = PairingCode.objects.get()
    assert issued.code not in str(row.__dict__)
    assert row.code_hash == hash_code(issued.code)
    # Keyed: a plain SHA-256 of the code, which anyone could tabulate, differs.
    import hashlib

    assert row.code_hash != hashlib.sha256(issued.code.encode()).hexdigest()


def test_device_secret_has_at_least_128_bits(issue_code):
    issued = issue_code()
    # token_urlsafe(32): 32 random bytes, 43 base64 characters.
    assert len(issued.device_secret) >= 43
    assert PairingCode.objects.get().device_secret_hash != issued.device_secret


def test_code_is_valid_until_600_seconds_and_not_after(issue_code, alice):
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        issued = issue_code()
    assert timedelta(seconds=600) == CODE_TTL
    row = PairingCode.objects.find(issued.code)
    assert row is not None
    assert row.state(start + timedelta(seconds=599)) == "live"
    assert row.state(start + timedelta(seconds=600)) == "expired"
    with pytest.raises(CodeExpired):
        row.redeem(alice, now=start + timedelta(seconds=600))
    island = row.redeem(alice, now=start + timedelta(seconds=599, microseconds=999_999))
    assert island.owner == alice


def test_live_codes_for_one_host_coexist_over_http_and_nats(issue_code):
    first = issue_code()
    second = issue_code(channel=PairingCode.Channel.NATS)
    third = issue_code(channel=PairingCode.Channel.NATS)
    fourth = issue_code(ip="198.51.100.9")
    now = timezone.now()
    states = {PairingCode.objects.find(issued.code).state(now) for issued in (first, second, third, fourth)}
    assert states == {"live"}


def test_redeeming_one_code_retires_the_hosts_others(issue_code, alice):
    codes = [issue_code(), issue_code(channel=PairingCode.Channel.NATS), issue_code(ip="198.51.100.9")]
    PairingCode.objects.lookup(codes[1].code).redeem(alice)
    now = timezone.now()
    states = [PairingCode.objects.find(issued.code).state(now) for issued in codes]
    assert states == ["retired", "used", "retired"]


def test_live_codes_are_unique(issue_code, monkeypatch):
    first = issue_code(host_id="host-aaaa-1111")
    draws = iter([first.code, first.code, "ZZZZZ9"])
    monkeypatch.setattr("pairing.models.generate_code", lambda: next(draws))
    second = issue_code(host_id="host-bbbb-2222")
    assert second.code == "ZZZZZ9"
    assert PairingCode.objects.count() == 2


def test_an_expired_code_frees_its_value_for_a_new_draw(issue_code, monkeypatch):
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        first = issue_code(host_id="host-aaaa-1111")
    monkeypatch.setattr("pairing.models.generate_code", lambda: first.code)
    with time_machine.travel(start + timedelta(minutes=11), tick=False):
        second = issue_code(host_id="host-bbbb-2222")
        row = PairingCode.objects.find(second.code)
        assert row is not None and row.host_id == "host-bbbb-2222"
        assert row.state(timezone.now()) == "live"


def test_prune_deletes_only_codes_expired_longer_than_the_retention(issue_code):
    from django.core.management import call_command

    start = timezone.now()
    with time_machine.travel(start - timedelta(days=8), tick=False):
        issue_code(host_id="host-old-00001")
    with time_machine.travel(start - timedelta(days=6), tick=False):
        issue_code(host_id="host-recent-01")
    issue_code(host_id="host-live-0001")
    with time_machine.travel(start, tick=False):
        call_command("prune_pairing_codes", "--days", "7")
    remaining = sorted(PairingCode.objects.values_list("host_id", flat=True))
    assert remaining == ["host-live-0001", "host-recent-01"]
