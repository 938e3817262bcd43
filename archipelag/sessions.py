"""Sessions in the database, as Django's own backend keeps them, minus lookups of keys it never issues.

Set as SESSION_ENGINE. Django issues 32-character keys of a-z and 0-9 and
looks up whatever a cookie holds; a NUL in a forged cookie then reached
PostgreSQL, which cannot compare text with NUL and raised: a 500 on every
page, and a crash in the websocket's authentication.
"""

from django.contrib.sessions.backends.db import SessionStore as DatabaseSessionStore


class SessionStore(DatabaseSessionStore):
    def _validate_session_key(self, key: str | None) -> bool:
        # Django's own check is "at least 8 characters". A key that fails is
        # treated as no key: a new, empty session, and no query.
        return key is not None and len(key) >= 8 and key.isascii() and key.isalnum()
