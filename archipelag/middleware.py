from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse
from django.shortcuts import resolve_url
from django.utils.deprecation import MiddlewareMixin


class HtmxLoginRedirectMiddleware(MiddlewareMixin):
    """Send the browser, not htmx, to the login page when a session has expired.

    `login_required` answers a 302 to the login page. The browser follows it
    inside htmx's request, and htmx swaps the whole login page, header
    included, into a piece of the page. For htmx requests the redirect
    becomes HX-Redirect instead: htmx navigates the window there, and `next`
    is the page the browser shows, not the fragment's URL.
    """

    def process_response(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        htmx = getattr(request, "htmx", None)
        if not htmx or response.status_code != 302:
            return response
        if urlsplit(response["Location"]).path != resolve_url(settings.LOGIN_URL):
            return response
        next_url = htmx.current_url_abs_path or request.get_full_path()
        login_url = redirect_to_login(next_url)["Location"]
        return HttpResponse(status=204, headers={"HX-Redirect": login_url})
