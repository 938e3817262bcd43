"""The worked example in docs/karma.md is what `manage.py karma_example` prints."""

import io
import re
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from islands.models import Island
from karma.models import KarmaEvent
from tests.karma.conftest import make_island

DOC = Path(__file__).resolve().parents[2] / "docs" / "karma.md"


def test_the_documented_example_is_the_commands_output(db):
    out = io.StringIO()
    call_command("karma_example", stdout=out)
    printed = out.getvalue().strip()
    documented = re.search(r"## Worked example.*?```text\n(.*?)\n```", DOC.read_text(), re.S)
    assert documented, "docs/karma.md has no worked example"
    assert printed == documented.group(1)
    # The story it tells: a two-hour silence (seven steps), one failure, and no bonus for a broken day.
    assert printed.count("Offline without signing off") == 7
    assert "Job example-05 failed" in printed
    assert "Online all day on 2026-03-01 (UTC)" in printed
    assert "No uptime bonus for 2026-03-02" in printed
    # And nothing of it is left behind.
    assert not Island.objects.exists() and not KarmaEvent.objects.exists()


def test_the_example_keeps_away_from_a_database_with_islands(alice):
    make_island(alice)
    with pytest.raises(CommandError, match="without Islands"):
        call_command("karma_example", stdout=io.StringIO())
