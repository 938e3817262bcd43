from datetime import timedelta
from decimal import Decimal

from django import template

from karma import rules

register = template.Library()


@register.filter
def standing(score: Decimal) -> rules.Standing:
    """The level, next level and progress of a score, for the cards and the Island page."""
    return rules.standing(score)


@register.filter
def points(value: Decimal | int | None) -> str:
    """Decimal("72.50") -> "72.5", Decimal("50.00") -> "50": karma without trailing zeros."""
    if value is None:
        return ""
    text = f"{Decimal(value):f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


@register.filter
def signed(value: Decimal | int) -> str:
    """+1, −2, +0.25, ±0: a change of karma, with a true minus sign."""
    text = points(abs(Decimal(value)))
    if value > 0:
        return f"+{text}"
    if value < 0:
        return f"−{text}"
    return "±0"


@register.filter
def magnitude(value: Decimal | int) -> str:
    """−1.5 -> "1.5": the size of a change, where the sentence says which way it goes."""
    return points(abs(Decimal(value)))


@register.filter
def duration_words(span: timedelta) -> str:
    """timedelta(seconds=45) -> "45 s", as the rules describe durations."""
    return rules.describe_duration(span)
