"""Paths under /api/ that name no endpoint answer in JSON, like every API error."""

import pytest


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/islands/jobs//status",  # an empty job id
        "/api/v1/islands/jobs/a%2Fb/status",  # a job id with a slash
        "/api/v1/islands/heartbeat/",
        "/api/v2/ping",
        "/api/",
    ],
)
def test_an_unknown_api_path_is_a_json_404(client, db, path):
    """Found by tests/fuzz: these were Django's HTML 404 page."""
    response = client.post(path, b"{}", content_type="application/json")
    assert response.status_code == 404
    assert response.json() == {"success": False, "error": "no such endpoint: see docs/api.md"}


def test_other_unknown_paths_keep_the_html_page(client, db):
    response = client.get("/no-such-page")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")
