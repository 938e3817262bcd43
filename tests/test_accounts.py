from django.contrib.auth.models import User

from tests.conftest import PASSWORD


def test_sign_up_logs_in_and_lands_on_your_islands(client, db):
    response = client.post(
        "/accounts/signup/",
        {"username": "carol", "email": "carol@example.com", "password1": PASSWORD, "password2": PASSWORD},
        follow=True,
    )
    assert response.redirect_chain[-1] == ("/settings", 302)
    assert "Your Islands" in response.content.decode()
    assert User.objects.get().username == "carol"


def test_sign_up_errors_are_shown_and_nothing_is_created(client, db):
    response = client.post(
        "/accounts/signup/",
        {"username": "carol", "email": "carol@example.com", "password1": "a", "password2": "b"},
    )
    assert response.status_code == 400
    assert "The two password fields didn’t match." in response.content.decode()
    assert User.objects.count() == 0


def test_sign_up_follows_next_only_within_the_site(client, db):
    response = client.post(
        "/accounts/signup/?next=https://evil.example/",
        {"username": "carol", "email": "carol@example.com", "password1": PASSWORD, "password2": PASSWORD},
    )
    assert response["Location"] == "/settings"
    client.logout()
    response = client.post(
        "/accounts/signup/?next=/pair",
        {"username": "dave", "email": "dave@example.com", "password1": PASSWORD, "password2": PASSWORD},
    )
    assert response["Location"] == "/pair"


def test_log_in_and_out(client, alice):
    response = client.post("/accounts/login/", {"username": "alice", "password": PASSWORD, "next": "/pair"})
    assert response["Location"] == "/pair"
    assert client.get("/pair").status_code == 200
    response = client.post("/accounts/logout/", follow=True)
    assert response.redirect_chain == [("/", 302)]
    assert ">Log in</a>" in response.content.decode()
    assert client.get("/pair").status_code == 302


def test_wrong_password_shows_an_error(client, alice):
    response = client.post("/accounts/login/", {"username": "alice", "password": "nope"})
    assert response.status_code == 200
    assert "Please enter a correct username and password" in response.content.decode()


def test_a_forged_session_cookie_is_nobody_and_is_not_looked_up(client, db, django_assert_num_queries):
    """Found by tests/fuzz: a NUL in the cookie reached PostgreSQL, which raised (a 500)."""
    client.cookies["sessionid"] = "\x00" * 32
    with django_assert_num_queries(0):
        response = client.get("/settings")
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_an_htmx_request_without_a_session_is_sent_to_the_login_page_by_hx_redirect(client, db):
    response = client.get(
        "/settings", headers={"HX-Request": "true", "HX-Current-URL": "http://testserver/settings?sort=karma"}
    )
    assert response.status_code == 204
    assert response["HX-Redirect"] == "/accounts/login/?next=/settings%3Fsort%3Dkarma"
    assert response.content == b""


def test_a_plain_request_without_a_session_still_gets_the_redirect(client, db):
    response = client.get("/settings")
    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/?next=/settings"
    assert "HX-Redirect" not in response
