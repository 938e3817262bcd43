"""The placement weight: karma ** 2 above the floor, nothing below it.

The draw that uses it (the share of jobs each Island gets) is tested through
real submissions in tests/islands/test_placement.py.
"""

from decimal import Decimal

from karma import rules


def test_the_weight_is_karma_squared_from_the_floor_up():
    assert rules.placement_weight(Decimal(100)) == 10_000
    assert rules.placement_weight(Decimal(50)) == 2_500
    assert rules.placement_weight(rules.PLACEMENT_FLOOR) == float(rules.PLACEMENT_FLOOR) ** 2


def test_below_the_floor_the_weight_is_zero():
    assert rules.placement_weight(Decimal("24.99")) == 0
    assert rules.placement_weight(Decimal(0)) == 0


def test_the_exponent_is_read_from_the_rules(monkeypatch):
    monkeypatch.setattr(rules, "PLACEMENT_EXPONENT", 1)
    assert rules.placement_weight(Decimal(100)) == 100.0
