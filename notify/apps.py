from django.apps import AppConfig


class NotifyConfig(AppConfig):
    name = "notify"
    verbose_name = "Notifications"

    def ready(self) -> None:
        # notify stands on islands, pairing and karma and listens to their
        # signals; they never import it (docs/architecture.md).
        from islands.signals import island_linked, island_silent
        from karma.signals import score_changed
        from notify import alerts

        island_silent.connect(alerts.on_silence, dispatch_uid="notify.offline")
        island_linked.connect(alerts.on_linked, dispatch_uid="notify.linked")
        score_changed.connect(alerts.on_score_changed, dispatch_uid="notify.karma_level")
