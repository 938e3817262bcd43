from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from archipelag.htmx import HtmxHttpRequest
from islands.models import Island


def _island_for(request: HttpRequest, pk: str) -> Island:
    """One of the signed-in user's active Islands, or 404 (never another user's)."""
    return get_object_or_404(Island.objects.owned_by(request.user), pk=pk)  # type: ignore[arg-type]


@login_required
def settings_page(request: HtmxHttpRequest) -> HttpResponse:
    """ "Your Islands". With htmx (the Refresh button) only the list is rendered."""
    islands = Island.objects.owned_by(request.user)  # type: ignore[arg-type]
    template = "islands/settings.html#island-list" if request.htmx else "islands/settings.html"
    return render(request, template, {"islands": islands})


@login_required
@require_POST
def remove(request: HttpRequest, pk: str) -> HttpResponse:
    """Unlink an Island. Its API token stops working at once."""
    island = _island_for(request, pk)
    island.remove()
    messages.success(request, f"Island “{island.name}” was removed. Its token no longer works.")
    return redirect("islands:settings")
