"""Levels: a name for each band of the score, and the way to the next one."""

from decimal import Decimal

import pytest

from karma import rules


@pytest.mark.parametrize(
    ("score", "level", "next_level", "percent"),
    [
        ("0", "Adrift", "Anchored", 0),
        ("24.99", "Adrift", "Anchored", 99),
        ("25", "Anchored", "Harbor", 0),
        ("32.5", "Anchored", "Harbor", 50),
        ("39.99", "Anchored", "Harbor", 99),
        ("40", "Harbor", "Lighthouse", 0),
        ("50", "Harbor", "Lighthouse", 33),
        ("51", "Harbor", "Lighthouse", 36),
        ("69.99", "Harbor", "Lighthouse", 99),
        ("70", "Lighthouse", "Flagship", 0),
        ("89.99", "Lighthouse", "Flagship", 99),
        ("90", "Flagship", None, 100),
        ("100", "Flagship", None, 100),
    ],
)
def test_level_and_progress_to_the_next(score, level, next_level, percent):
    standing = rules.standing(Decimal(score))
    assert standing.level.name == level
    assert (standing.next_level.name if standing.next_level else None) == next_level
    assert standing.percent == percent
    assert standing.top is (next_level is None)


def test_what_is_left_to_the_next_level():
    assert rules.standing(Decimal("62.75")).to_go == Decimal("7.25")
    assert rules.standing(Decimal(95)).to_go == Decimal(0)


def test_new_islands_start_at_harbor():
    assert rules.standing(rules.START).level.name == "Harbor"


def test_a_new_islands_first_failure_or_timeout_leaves_it_in_harbor():
    # Not on Harbor's lower edge: one bad job must not demote a new Island.
    assert rules.standing(rules.START + rules.JOB_FAILED).level.name == "Harbor"
    assert rules.standing(rules.START + rules.JOB_TIMED_OUT).level.name == "Harbor"
    assert rules.standing(rules.START + 2 * rules.JOB_TIMED_OUT).level.name == "Harbor"


def test_there_are_about_five_levels_in_order_covering_the_range():
    thresholds = [level.threshold for level in rules.LEVELS]
    assert 4 <= len(rules.LEVELS) <= 6
    assert thresholds == sorted(set(thresholds))
    assert thresholds[0] == rules.MINIMUM
    assert thresholds[-1] <= rules.MAXIMUM
