"""Django's floor: one view, no middleware (bench/bare_settings.py), on Django's ASGI handler.

    daphne bench.bare_asgi:application

`POST /bare` answers what `/api/v1/ping` answers, `{"success": true}`, from
a plain synchronous view, as ping is. The same settings otherwise (the
database pool, the channel layer, DEBUG off), so the difference to ping is
the project's middleware and routing.
"""

import os

from django.core.asgi import get_asgi_application

os.environ["DJANGO_SETTINGS_MODULE"] = "bench.bare_settings"
application = get_asgi_application()

from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402


def bare(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"success": True})


urlpatterns = [path("bare", bare)]
