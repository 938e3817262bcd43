from django.apps import AppConfig


class ArchipelagConfig(AppConfig):
    name = "archipelag"
    verbose_name = "Archipelag.io"

    def ready(self) -> None:
        from archipelag import checks  # noqa: F401  (registers the system checks)
