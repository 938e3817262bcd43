"""Bearer secrets: drawing them and the one way they are stored.

Device secrets, scan secrets, Island API tokens and dispatcher keys are all
256 random bits, shown once and kept only as a hash. Pairing codes are
different (short, so hashed with a key): see pairing/codes.py.
"""

import hashlib
import secrets


def generate_secret() -> str:
    """A bearer secret of 256 random bits (device secrets, scan secrets, API tokens)."""
    return secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """Hash of a high-entropy secret. No key or stretching is needed at 256 bits."""
    return hashlib.sha256(secret.encode()).hexdigest()
