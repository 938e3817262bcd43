"""Pairing codes: drawing, normalising and hashing them.

A code is 6 symbols of a 32-symbol alphabet without I, L, O and U, so it
reads aloud and types without ambiguity: 32**6 is about 1.07 billion codes.
What people type is normalised the forgiving way (case, spaces, hyphens, and
the look-alikes O, I and L) before it is compared.

Codes are stored only as a keyed hash (HMAC-SHA256 under a key derived from
SECRET_KEY): a database dump alone does not reveal live codes, and the hash
cannot be brute-forced over the small code space without the key.
"""

import secrets

from django.utils.crypto import salted_hmac

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CODE_LENGTH = 6

# Look-alikes read as the digit they resemble. U has no reading: it is not
# in the alphabet and is simply invalid.
_LOOKALIKES = str.maketrans({"O": "0", "I": "1", "L": "1"})
_SEPARATORS = str.maketrans("", "", " -\t\u00a0")
_ALPHABET_SET = frozenset(ALPHABET)


class MalformedCode(ValueError):
    """What the user typed cannot be a pairing code at all."""


def generate_code() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(CODE_LENGTH))


def normalize_code(raw: str) -> str:
    """Return the canonical code for what a person typed, or raise MalformedCode."""
    if len(raw) > 64:
        raise MalformedCode("That is too long for a pairing code.")
    code = raw.strip().upper().translate(_SEPARATORS).translate(_LOOKALIKES)
    if not code:
        raise MalformedCode("Enter the 6-character code your Island shows.")
    if len(code) != CODE_LENGTH or not set(code) <= _ALPHABET_SET:
        raise MalformedCode(
            "A pairing code is exactly 6 letters and digits, like A3X9K2. Check the code your Island shows."
        )
    return code


def hash_code(code: str) -> str:
    """Keyed hash of a canonical code, the only form in which codes are stored."""
    return salted_hmac("archipelag.pairing.code", code, algorithm="sha256").hexdigest()
