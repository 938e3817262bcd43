"""Admin pieces the apps share."""

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from islands.models import Island


class ReadOnlyInline[M: Any](admin.TabularInline[M, Island]):
    """Rows shown under an Island in its admin page, never edited there: ledgers and history."""

    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
