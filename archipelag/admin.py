"""Admin pieces the apps share."""

from typing import Any

from django.contrib import admin
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth import get_permission_codename
from django.db.models import Model, QuerySet
from django.forms import BaseInlineFormSet
from django.http import HttpRequest, HttpResponse

from archipelag.auth import ThrottledAuthenticationForm


class ThrottledAdminAuthenticationForm(ThrottledAuthenticationForm, AdminAuthenticationForm):
    """The admin's login form (staff only), counted like the site's (archipelag.auth)."""


class AdminSite(admin.AdminSite):
    """The admin, whose login counts attempts like the site's and answers 429/503 with the wait.

    Installed as the default site by archipelag.apps.AdminConfig, so every
    `admin.site.register` and `@admin.register` lands here.
    """

    login_form = ThrottledAdminAuthenticationForm

    def login(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        response = super().login(request, extra_context)
        form = getattr(response, "context_data", None) and response.context_data.get("form")  # type: ignore[attr-defined]
        if isinstance(form, ThrottledAuthenticationForm):
            return form.answer(response)
        return response


def has_model_permission(request: HttpRequest, model: type[Model], action: str) -> bool:
    """Whether the user holds the model's own `action` permission ("change", "add", ...).

    For admin actions whose admin answers no to has_change_permission (a
    read-only ledger) but which some staff may still run, such as revoking
    a key: the action asks for the permission the user was given, not for
    what the admin's forms allow.
    """
    opts = model._meta
    return request.user.has_perm(f"{opts.app_label}.{get_permission_codename(action, opts)}")


class ReadOnlyAdmin:
    """Ledgers and records the service writes itself: shown, never added, edited or deleted."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class ReadOnlyInline[M: Model, P: Model](ReadOnlyAdmin, admin.TabularInline[M, P]):
    """Rows shown under their parent's admin page, never edited there: ledgers and history."""

    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = True


def newest_first(rows: int) -> type[BaseInlineFormSet]:  # type: ignore[type-arg]
    """An inline formset listing only the first `rows` rows (the inline's ordering says which).

    For ledgers that grow without end: the admin page shows the newest, and
    the full list is one filtered changelist away.
    """

    class NewestFirst(BaseInlineFormSet):  # type: ignore[type-arg]
        def get_queryset(self) -> QuerySet[Any]:
            return super().get_queryset()[:rows]

    NewestFirst.__name__ = f"Newest{rows}"
    return NewestFirst
