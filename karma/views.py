from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from karma import rules

# Scores of the example Islands in the placement section.
PLACEMENT_EXAMPLE = (Decimal(100), Decimal(75), Decimal(50), Decimal(20))
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def _no_change_unless(change: rules.Change | None) -> Decimal:
    return Decimal(0) if change is None else change.delta


def reference(request: HttpRequest) -> HttpResponse:
    """/reference/karma: how karma works, with the numbers the code applies.

    Everything shown is read from karma.rules when the page is rendered, and
    the examples are computed by the same functions the rules use.
    """
    grace, step = rules.DISCONNECTION_GRACE, rules.DISCONNECTION_STEP
    cap_reached_after = grace + (rules.DISCONNECTION_MAX_STEPS - 1) * step
    durations = [
        grace - timedelta(seconds=1),
        grace + timedelta(seconds=1),
        timedelta(hours=1),
        timedelta(hours=2),
        cap_reached_after + timedelta(seconds=1),
        timedelta(days=1),
    ]
    weights = [rules.placement_weight(score) for score in PLACEMENT_EXAMPLE]
    context = {
        "rules": rules,
        "offline_after": timedelta(seconds=settings.ISLAND_OFFLINE_AFTER),
        "levels": rules.level_ranges(),
        "start": rules.standing(rules.START),
        "jobs": [
            (
                f"Succeeded, started within {rules.describe_duration(rules.QUICK_START)} of assignment",
                rules.JOB_SUCCEEDED_QUICK,
            ),
            (
                f"Succeeded, started within {rules.describe_duration(rules.SLOW_START)} of assignment",
                rules.JOB_SUCCEEDED,
            ),
            ("Succeeded, started later or never reported its start", rules.JOB_SUCCEEDED_SLOW),
            ("Failed", rules.JOB_FAILED),
            ("Timed out: no final state before the lease expired", rules.JOB_TIMED_OUT),
            # No rule: for_job() records nothing for a cancelled job.
            ("Cancelled", _no_change_unless(rules.for_job("example", "cancelled", _EPOCH, None))),
        ],
        "quick_start": rules.describe_duration(rules.QUICK_START),
        "slow_start": rules.describe_duration(rules.SLOW_START),
        "grace": rules.describe_duration(grace),
        "step": rules.describe_duration(step),
        "cap": rules.disconnection_cap(),
        "cap_reached_after": rules.describe_duration(cap_reached_after),
        "disconnections": [
            (rules.describe_duration(span), rules.disconnection_cost(span)) for span in durations
        ],
        "uptime_settle": rules.describe_duration(rules.UPTIME_SETTLE),
        "placement": [
            (score, weight, 100 * weight / sum(weights))
            for score, weight in zip(PLACEMENT_EXAMPLE, weights, strict=True)
        ],
    }
    return render(request, "karma/reference.html", context)
