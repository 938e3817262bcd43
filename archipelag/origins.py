"""Which sites a browser websocket may be opened from."""

from typing import Any
from urllib.parse import ParseResult

from channels.security.websocket import OriginValidator
from django.conf import settings


def site_origins() -> list[str]:
    """PUBLIC_URL's origin and CSRF_TRUSTED_ORIGINS, as Channels' origin patterns.

    Each names a scheme, a host and (by default for the scheme) a port.
    Django writes a trusted origin's subdomain wildcard `https://*.example.org`;
    Channels writes it `https://.example.org`.
    """
    origins = [settings.PUBLIC_URL, *settings.CSRF_TRUSTED_ORIGINS]
    return [origin.replace("://*.", "://.", 1) for origin in origins]


class SiteOriginValidator(OriginValidator):
    """Refuse a socket unless its Origin is the site's own: scheme, host and port.

    Channels' AllowedHostsOriginValidator compares the host alone, so a page
    on another port of the same host (`http://127.0.0.1:9999`, anything a
    user runs locally) or on plain http could open a socket with the
    user's cookie. Settings are read at each handshake, as Django reads them.
    """

    def __init__(self, application: Any):
        super().__init__(application, [])

    def validate_origin(self, parsed_origin: ParseResult | None) -> bool:
        return any(self.match_allowed_origin(parsed_origin, pattern) for pattern in site_origins())
