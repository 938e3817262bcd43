import hmac
import json
import time
from argparse import ArgumentParser
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from django.core.management.base import BaseCommand

from notify.webhooks import sign

# The Standard Webhooks tolerance: a timestamp further off than this is refused.
TOLERANCE = 5 * 60


class Command(BaseCommand):
    help = (
        "A local webhook receiver for trying webhooks out: prints each event it gets and whether "
        "its signature checks out. Add http://127.0.0.1:PORT/ on /settings/notifications (allowed "
        "with DEBUG) and pass the secret shown there."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--port", type=int, default=8001, help="Port on 127.0.0.1 (default 8001).")
        parser.add_argument(
            "--secret", default="", help="The endpoint's whsec_... secret, to check signatures."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        secret: str = options["secret"]
        out = self.stdout

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                message_id = self.headers.get("webhook-id", "")
                stamp = self.headers.get("webhook-timestamp", "")
                given = self.headers.get("webhook-signature", "")
                verdict = "not checked (no --secret)"
                if secret:
                    fresh = stamp.isdigit() and abs(time.time() - int(stamp)) <= TOLERANCE
                    expected = sign(secret, message_id, int(stamp), body) if stamp.isdigit() else ""
                    good = any(hmac.compare_digest(expected, part) for part in given.split())
                    verdict = "valid" if good and fresh else "INVALID"
                try:
                    event = json.loads(body)
                    shown = json.dumps(event, indent=2)
                except ValueError:
                    event, shown = {}, body.decode(errors="replace")
                out.write(f"POST {self.path} webhook-id={message_id} webhook-timestamp={stamp}")
                out.write(f"  type={event.get('type')} signature {verdict}\n{shown}\n")
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = HTTPServer(("127.0.0.1", options["port"]), Handler)
        out.write(f"Receiving webhooks at http://127.0.0.1:{options['port']}/ ; Ctrl-C stops.")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
