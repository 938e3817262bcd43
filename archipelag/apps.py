from django.apps import AppConfig
from django.contrib.admin import apps as admin_apps


class ArchipelagConfig(AppConfig):
    name = "archipelag"
    verbose_name = "Archipelag.io"

    def ready(self) -> None:
        from archipelag import checks  # noqa: F401  (registers the system checks)


class AdminConfig(admin_apps.AdminConfig):
    """django.contrib.admin with the project's site (throttled login; archipelag.admin.AdminSite)."""

    # Named in INSTALLED_APPS in full; "archipelag" alone still means ArchipelagConfig.
    default = False
    default_site = "archipelag.admin.AdminSite"
