"""Production configuration: `check --deploy` is clean, and refuses unsafe settings."""

import os
import subprocess
import sys
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

PRODUCTION = {
    "DEBUG": "0",
    "SECRET_KEY": "x7%Qk2!vL9#pR4@wN8^zT1&bY6*cH3(jM5)sD0-fG2+hK7=aPq93kdZ",
    "ALLOWED_HOSTS": "islands.example.org",
    "PUBLIC_URL": "https://islands.example.org",
    "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/archipelag",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    # Without a mail server Django's check refuses the console backend in production.
    "EMAIL_HOST": "smtp.example.org",
}


def check_deploy(**overrides):
    env = {key: value for key, value in os.environ.items() if key not in PRODUCTION}
    env.update(PRODUCTION)
    env.update(overrides)
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_deploy_reports_nothing_with_production_settings():
    result = check_deploy()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_check_deploy_refuses_the_development_secret_key():
    env = {key: value for key, value in PRODUCTION.items() if key != "SECRET_KEY"}
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy"],
        cwd=BASE_DIR,
        env={**{k: v for k, v in os.environ.items() if k != "SECRET_KEY"}, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "archipelag.E001" in result.stderr


def test_check_deploy_wants_an_https_public_url():
    result = check_deploy(PUBLIC_URL="http://islands.example.org")
    assert result.returncode != 0
    assert "archipelag.E002" in result.stderr


def test_postgresql_connections_run_without_jit(postgres, db):
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SHOW jit")
        assert cursor.fetchone()[0] == "off"
