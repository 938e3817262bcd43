"""A SQLite database named by DATABASE_URL gets the options of the default one.

Without them (BEGIN IMMEDIATE, a busy timeout, WAL), two requests writing at
once fail at once with "database is locked", which the API answers with 503:
a server started on `DATABASE_URL=sqlite:///...` (the tests' daphne, a second
copy of the demo) lost heartbeats and job submissions that way.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

PROBE = """
import json, django
django.setup()
from django.db import connection
with connection.cursor() as cursor:
    timeout = cursor.execute("PRAGMA busy_timeout").fetchone()[0]
    journal = cursor.execute("PRAGMA journal_mode").fetchone()[0]
print(json.dumps({"mode": connection.transaction_mode, "busy_timeout": timeout, "journal": journal}))
"""


def probe(**env: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=BASE_DIR,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "archipelag.settings", **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(result.stdout))


def test_a_sqlite_url_queues_writers_like_the_default_file(tmp_path):
    assert probe(DATABASE_URL=f"sqlite:///{tmp_path / 'other.sqlite3'}") == {
        "mode": "IMMEDIATE",
        "busy_timeout": 20000,
        "journal": "wal",
    }
