"""What hosts are told about their Islands, decided where the events happen.

Each alert is an outbox row (notify.models) written in the transaction of
the event that causes it: the watcher's recorded silence (islands.signals.
island_silent), the link (island_linked), the karma event (karma.signals.
score_changed). Returns to online are recorded by heartbeats, whose path
stays one small write: the watcher notices them instead (record_returns).
"""

import logging
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core import signing
from django.db import transaction
from django.db.models import OuterRef, Subquery, Sum
from django.urls import reverse

from islands.models import WATCH_BATCH, Island, MaintenanceWindow, StatusChange
from karma import rules as karma_rules
from karma.models import KarmaEvent
from notify.models import Notification, Preferences

logger = logging.getLogger("notify.alerts")

# More transitions than this within an hour make an Island "flapping": one
# summary at the end of the clock hour instead of a message per transition.
FLAPPING_TRANSITIONS = 3
FLAPPING_WINDOW = timedelta(hours=1)
# A score hovering at a level boundary is told once in this time, not at every crossing.
KARMA_LEVEL_QUIET = timedelta(hours=24)
# How long a "This wasn't me" link works.
NOT_ME_DAYS = 7
NOT_ME_SALT = "notify.island.not_me"


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def absolute(path: str) -> str:
    return f"{settings.PUBLIC_URL}{path}"


def island_data(island: Island) -> dict[str, Any]:
    """What every Island event says about its Island."""
    return {
        "island_id": str(island.pk),
        "host_id": island.host_id,
        "name": island.name,
        "url": absolute(reverse("islands:detail", args=[island.pk])),
    }


def _flapping(island_id: Any, at: datetime) -> bool:
    transitions = StatusChange.objects.filter(
        island_id=island_id,
        reason__in=[StatusChange.Reason.SILENCE, StatusChange.Reason.BACK_ONLINE],
        at__gt=at - FLAPPING_WINDOW,
        at__lte=at,
    ).count()
    return transitions > FLAPPING_TRANSITIONS


def _hold_for_summary(island: Island, at: datetime, now: datetime) -> None:
    """Count this transition into the clock hour's summary, written once and sent when the hour ends."""
    start = at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    end = start + timedelta(hours=1)
    silences = StatusChange.objects.filter(
        island=island, reason=StatusChange.Reason.SILENCE, at__gte=start, at__lt=end
    ).count()
    data = {
        **island_data(island),
        "from": iso(start),
        "until": iso(end),
        "went_offline": silences,
    }
    key = f"flapping:{island.pk}:{start:%Y%m%d%H}"
    recorded = Notification.objects.record(
        island.owner, Notification.Kind.FLAPPING, key, data, now, island.pk, send_at=end
    )
    if recorded is None:
        Notification.objects.filter(key=key).update(data=data)


# --- Offline ----------------------------------------------------------------------


def on_silence(sender: Any, *, change: StatusChange, now: datetime, **kwargs: Any) -> None:
    """An Island went silent: its offline alert, due once the owner's grace has passed.

    Written now, in the watcher's transaction; the sender looks again when it
    falls due and sends nothing if the Island came back within the grace
    (alert_still_due), so a return costs no write here.
    """
    island = Island.objects.select_related("owner").get(pk=change.island_id)
    if _flapping(island.pk, change.at):
        _hold_for_summary(island, change.at, now)
        return
    grace = Preferences.objects.of(island.owner).offline_grace
    due = change.at + grace
    silent_since = island.last_heartbeat_at or change.at
    data = {
        **island_data(island),
        "silent_since": iso(silent_since),
        "deadline": iso(change.at),
        "due_at": iso(due),
        "charges_from": iso(change.at + karma_rules.DISCONNECTION_GRACE),
    }
    Notification.objects.record(
        island.owner,
        Notification.Kind.OFFLINE,
        f"offline:{change.pk}",
        data,
        now,
        island.pk,
        send_at=due,
        status_change_id=change.pk,
    )


def _closing_change(silence_pk: int, island_id: Any) -> StatusChange | None:
    # One Island's changes are recorded under its row lock, each from the
    # previous one's status: primary key order is their order.
    return StatusChange.objects.filter(island_id=island_id, pk__gt=silence_pk).order_by("pk").first()


def effective_due(island_id: Any, due: datetime) -> datetime:
    """When an offline alert due at `due` may go: after any maintenance window covering that moment.

    The sender and the watcher's look for returns both ask this, so an alert
    held by maintenance and its back-online message are decided alike.
    """
    for starts, ends in sorted(MaintenanceWindow.objects.covering(island_id)):
        if starts <= due < ends:
            due = ends
    return due


def alert_still_due(notification: Notification, now: datetime) -> tuple[bool, datetime | None, str]:
    """For an offline alert falling due: send it, skip it, or look again later.

    Returns (send, later, why): send=False and later=None means skip.
    """
    if (
        notification.kind != Notification.Kind.OFFLINE
        or notification.status_change_id is None
        or notification.island_id is None
    ):
        return True, None, ""
    island = Island.objects.filter(pk=notification.island_id).first()
    if island is None or island.removed_at is not None:
        return False, None, "the Island was removed"
    due = effective_due(island.pk, datetime.fromisoformat(notification.data["due_at"]))
    closing = _closing_change(notification.status_change_id, island.pk)
    if closing is not None and closing.at < due:
        return False, None, "back within the grace or its maintenance"
    if now < due:
        # A maintenance window began after the alert was written: look again when it ends.
        return False, due, "in maintenance"
    return True, None, ""


# --- Back online ---------------------------------------------------------------------


def _karma_cost(silence_pk: int) -> Decimal:
    total = KarmaEvent.objects.filter(
        cause=KarmaEvent.Cause.DISCONNECTION, status_change_id=silence_pk
    ).aggregate(total=Sum("delta"))["total"]
    return total or Decimal(0)


def record_returns(now: datetime, limit: int = WATCH_BATCH) -> int:
    """The watcher's step: offline alerts whose silence ended get their back-online message.

    One back-online message per offline alert that was due (a return within
    the grace ends both quietly), written in the transaction that marks the
    alert resolved; the conditional UPDATE decides, so two watchers write it
    once. The cost in karma is read once the karma rules have settled the
    incident (they run earlier in the same step).
    """
    closing = StatusChange.objects.filter(
        island_id=OuterRef("island_id"), pk__gt=OuterRef("status_change_id")
    )
    rows = list(
        Notification.objects.filter(kind=Notification.Kind.OFFLINE, resolved_at__isnull=True)
        .annotate(
            closed_at=Subquery(closing.order_by("pk").values("at")[:1]),
            closed_reason=Subquery(closing.order_by("pk").values("reason")[:1]),
        )
        .filter(closed_at__isnull=False)
        .select_related("user")
        .order_by("pk")[:limit]
    )
    recorded = 0
    for alert in rows:
        closed_at: datetime = alert.closed_at
        if alert.status_change_id is None or alert.island_id is None:
            continue  # never: offline alerts name both
        due = effective_due(alert.island_id, datetime.fromisoformat(alert.data["due_at"]))
        silence = (
            StatusChange.objects.filter(pk=alert.status_change_id).values("at", "karma_settled_at").first()
        )
        wanted = closed_at >= due and silence is not None
        if wanted and silence is not None:
            lasted = closed_at - silence["at"]
            if lasted >= karma_rules.DISCONNECTION_GRACE and silence["karma_settled_at"] is None:
                continue  # the karma step has not charged it yet; next step
        with transaction.atomic():
            won = Notification.objects.filter(pk=alert.pk, resolved_at__isnull=True).update(resolved_at=now)
            if not won or not wanted:
                continue
            island = Island.objects.select_related("owner").filter(pk=alert.island_id).first()
            if island is None or island.removed_at is not None:
                continue
            if _flapping(island.pk, closed_at):
                _hold_for_summary(island, closed_at, now)
                continue
            silent_since = datetime.fromisoformat(alert.data["silent_since"])
            away = closed_at - silent_since
            data = {
                **island_data(island),
                "silent_since": alert.data["silent_since"],
                "back_at": iso(closed_at),
                "away_seconds": int(away.total_seconds()),
                "karma_cost": str(abs(_karma_cost(alert.status_change_id)).quantize(karma_rules.PLACES)),
                "signed_off": alert.closed_reason == StatusChange.Reason.GRACEFUL,
            }
            if Notification.objects.record(
                alert.user,
                Notification.Kind.ONLINE,
                f"online:{alert.status_change_id}",
                data,
                now,
                island.pk,
            ):
                recorded += 1
    return recorded


# --- A new Island ------------------------------------------------------------------


def not_me_token(island: Island) -> str:
    return signing.dumps({"i": str(island.pk), "o": island.owner_id}, salt=NOT_ME_SALT)


def island_from_not_me(token: str) -> Island | None:
    """The Island a "This wasn't me" link names, while it is still linked to the same owner."""
    try:
        payload = signing.loads(token, salt=NOT_ME_SALT, max_age=timedelta(days=NOT_ME_DAYS))
        island_id, owner_id = str(payload["i"]), int(payload["o"])
    except (signing.BadSignature, KeyError, TypeError, ValueError):
        return None
    return Island.objects.active().filter(pk=island_id, owner_id=owner_id).select_related("owner").first()


def on_linked(sender: Any, *, island: Island, address: str | None, now: datetime, **kwargs: Any) -> None:
    data = {
        **island_data(island),
        "hardware": island.hardware_summary,
        "kind": island.kind,
        "linked_at": iso(now),
        "address": address,
        "not_me_url": absolute(reverse("notify:not_me", args=[not_me_token(island)])),
    }
    # Keyed by the pairing's moment too: an Island removed and paired again is told again.
    key = f"linked:{island.pk}:{now:%Y%m%d%H%M%S%f}"
    Notification.objects.record(island.owner, Notification.Kind.LINKED, key, data, now, island.pk)


# --- Karma levels ----------------------------------------------------------------------


def on_score_changed(sender: Any, *, event: KarmaEvent, before: Decimal, **kwargs: Any) -> None:
    """Tell the owner when the score crosses a level boundary, at most once a day per Island.

    Levels are compared by the rules in force when the event is recorded, so
    changing where the levels begin tells nobody anything (no event, no message).
    """
    was = karma_rules.standing(before).level
    now_level = karma_rules.standing(event.score_after).level
    if was.name == now_level.name:
        return
    recent = Notification.objects.filter(
        kind=Notification.Kind.KARMA_LEVEL,
        island_id=event.island_id,
        created_at__gt=event.created_at - KARMA_LEVEL_QUIET,
    )
    if recent.exists():
        return
    island = Island.objects.select_related("owner").get(pk=event.island_id)
    data = {
        **island_data(island),
        "direction": "up" if event.score_after > before else "down",
        "from_level": was.name,
        "to_level": now_level.name,
        "meaning": now_level.meaning,
        "score": str(event.score_after),
        "reason": event.reason,
        "at": iso(event.created_at),
    }
    Notification.objects.record(
        island.owner,
        Notification.Kind.KARMA_LEVEL,
        f"karma_level:{event.pk}",
        data,
        event.created_at,
        island.pk,
    )
