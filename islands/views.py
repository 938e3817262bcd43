from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import render

from archipelag.htmx import HtmxHttpRequest
from islands.models import Island


@login_required
def settings_page(request: HtmxHttpRequest) -> HttpResponse:
    """ "Your Islands". With htmx (the Refresh button) only the list is rendered."""
    islands = Island.objects.owned_by(request.user)  # type: ignore[arg-type]
    template = "islands/settings.html#island-list" if request.htmx else "islands/settings.html"
    return render(request, template, {"islands": islands})
