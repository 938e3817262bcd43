from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from django import template

from islands.models import gigabytes

if TYPE_CHECKING:
    from islands.models import Island, IslandKey

register = template.Library()
register.filter("gigabytes", gigabytes)


@register.filter
def status_at(island: "Island", now: datetime) -> str:
    """The Island's status at the page's `now`, one clock reading for the whole page."""
    return island.status_at(now)


@register.filter
def maintenance_until(island: "Island", now: datetime) -> datetime | None:
    """When the Island's maintenance window ends, if one is going on at `now`."""
    return island.maintenance_until if island.in_maintenance(now) else None


@register.filter
def live_key(island: "Island", now: datetime) -> str:
    """What the live socket's snapshot compares with (Island.live_key)."""
    return island.live_key(now)


@register.filter
def key_state(key: "IslandKey", now: datetime) -> str:
    """An Island key's state at the page's `now`: unused, active, expired or revoked."""
    return key.state(now)


@register.filter
def ago(moment: datetime | None, now: datetime) -> str:
    """ "12 s ago", "3 min ago", "5 h ago", "2 days ago"; "never" for no time at all."""
    if moment is None:
        return "never"
    seconds = max(0, int((now - moment).total_seconds()))
    if seconds < 60:
        return f"{seconds} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    if seconds < 86400:
        return f"{seconds // 3600} h ago"
    days = seconds // 86400
    return f"{days} day{'' if days == 1 else 's'} ago"


@register.filter
def credits(amount: Decimal | None) -> str:
    """Decimal("12.5000") -> "12.5", Decimal("1234") -> "1,234"."""
    if amount is None:
        return "0"
    whole, _, fraction = f"{amount:f}".partition(".")
    fraction = fraction.rstrip("0")
    grouped = f"{int(whole):,}" if whole.lstrip("-").isdigit() else whole
    return f"{grouped}.{fraction}" if fraction else grouped
