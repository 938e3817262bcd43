from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, register


@register(Tags.security, deploy=True)
def check_production_settings(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    if settings.SECRET_KEY == settings.DEV_SECRET_KEY:
        errors.append(
            Error(
                "SECRET_KEY is the built-in development key.",
                hint="Set SECRET_KEY to a long random value; pairing codes are hashed with it.",
                id="archipelag.E001",
            )
        )
    if not settings.PUBLIC_URL.startswith("https://") and not settings.DEBUG:
        errors.append(
            Error(
                "PUBLIC_URL is not an https:// origin.",
                hint="Islands and phones are sent to PUBLIC_URL to pair; it must be the public https origin.",
                id="archipelag.E002",
            )
        )
    return errors
