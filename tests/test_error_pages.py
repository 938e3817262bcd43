"""The site's own 404 and 500 pages, and its favicon."""

from django.contrib.staticfiles import finders
from django.test import RequestFactory
from django.views.defaults import server_error


def test_a_missing_page_is_the_sites_own_404(client, db):
    response = client.get("/no-such-page")
    assert response.status_code == 404
    html = response.content.decode()
    assert "<title>Page not found · Archipelag.io</title>" in html
    assert "There is nothing at <code>/no-such-page</code>." in html
    assert 'href="/static/css/app.css"' in html
    assert 'class="brand"' in html


def test_a_missing_api_endpoint_still_answers_json(client, db):
    response = client.get("/api/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["success"] is False


def test_a_server_error_is_the_sites_own_500_without_a_request_context():
    response = server_error(RequestFactory().get("/"))
    assert response.status_code == 500
    html = response.content.decode()
    assert "<title>Something went wrong · Archipelag.io</title>" in html
    assert 'href="/static/css/app.css"' in html
    assert "Log out" not in html


def test_every_page_links_the_favicon_and_it_is_served(client, db):
    html = client.get("/").content.decode()
    assert '<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">' in html
    assert finders.find("favicon.svg")
