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


def test_a_new_island_is_drawn_at_the_floors_weight_until_its_tenth_completed_job():
    assert rules.PROBATION_JOBS == 10
    assert rules.PROBATION_KARMA == rules.PLACEMENT_FLOOR
    assert rules.draw_weight(rules.START, 0) == rules.placement_weight(rules.PLACEMENT_FLOOR) == 625
    assert rules.draw_weight(Decimal(90), 9) == 625
    assert rules.draw_weight(Decimal(90), 10) == 8_100
    assert rules.draw_weight(Decimal(30), 0) == 625
    assert rules.draw_weight(Decimal(24), 0) == 0  # below the floor, on probation or not
    assert rules.draw_weight(Decimal(24), 500) == 0


def test_a_fresh_identity_never_outweighs_a_record_that_gets_jobs():
    fresh = rules.draw_weight(rules.START, 0)
    for karma in range(int(rules.PLACEMENT_FLOOR), 101):
        assert fresh <= rules.draw_weight(Decimal(karma), rules.PROBATION_JOBS)


def test_probation_is_read_from_the_rules(monkeypatch):
    monkeypatch.setattr(rules, "PROBATION_JOBS", 3)
    monkeypatch.setattr(rules, "PROBATION_KARMA", Decimal(40))
    assert rules.draw_weight(Decimal(50), 2) == 1_600
    assert rules.draw_weight(Decimal(50), 3) == 2_500
