"""The embedded default prints emails whole: a long link is copied from the console as it is."""

import io

from django.core.mail import EmailMessage

from archipelag.mail import ConsoleBackend

LINK = "http://127.0.0.1:8000/accounts/email/confirm/" + "x" * 120 + "/"


def test_a_long_link_is_printed_on_one_line_without_soft_breaks():
    stream = io.StringIO()
    ConsoleBackend(stream=stream).send_messages(
        [EmailMessage("Confirm", f"Open:\n\n{LINK}\n· done", None, ["a@b.c"])]
    )
    printed = stream.getvalue()
    assert LINK in printed.splitlines()
    assert "Content-Transfer-Encoding: 8bit" in printed
