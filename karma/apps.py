from datetime import datetime
from typing import Any

from django.apps import AppConfig


def _karma_for_job(sender: Any, *, attempt_pk: int, now: datetime, **kwargs: Any) -> None:
    """The job rule, applied in the transaction that ended the attempt (islands.signals.job_finished)."""
    from karma.models import KarmaEvent

    KarmaEvent.objects.record_attempt(attempt_pk, now)


class KarmaConfig(AppConfig):
    name = "karma"

    def ready(self) -> None:
        from islands.signals import job_finished

        job_finished.connect(_karma_for_job, dispatch_uid="karma.job_rule")
