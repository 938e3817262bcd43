"""The console email backend of the embedded default (no EMAIL_HOST): links a newcomer can copy."""

import email.policy
from typing import Any

from django.core.mail.backends.console import EmailBackend


class ConsoleBackend(EmailBackend):
    """Django's console backend, printing bodies unwrapped.

    Django renders a message with the default policy (78-character lines),
    so a body line longer than that, such as a confirmation or unsubscribe
    link, is printed quoted-printable, broken by `=` soft line breaks that a
    copied link keeps. Here lines up to SMTP's limit stay whole. Only the
    console is changed: real mail goes out as Django renders it for SMTP.
    """

    policy = email.policy.default.clone(max_line_length=998)

    def write_message(self, message: Any) -> None:
        text = message.message(policy=self.policy).as_bytes().decode("utf-8", errors="replace")
        self.stream.write(f"{text}\n")
        self.stream.write("-" * 79)
        self.stream.write("\n")
