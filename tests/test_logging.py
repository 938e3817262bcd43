import json
import logging

from archipelag.logfmt import JsonFormatter, parse_pairs
from islands.models import Island


def test_event_lines_become_json_fields():
    record = logging.LogRecord(
        "archipelag.pairing",
        logging.INFO,
        __file__,
        1,
        "event=island_linked user_id=%s host_id=%s",
        (7, "h-1"),
        None,
    )
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "info"
    assert entry["logger"] == "archipelag.pairing"
    assert entry["event"] == "island_linked"
    assert entry["user_id"] == "7"
    assert entry["host_id"] == "h-1"
    assert "message" not in entry


def test_other_lines_keep_their_message():
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "plain words here", (), None)
    assert json.loads(JsonFormatter().format(record))["message"] == "plain words here"


def test_parse_pairs_handles_quoted_values():
    assert parse_pairs('event=x reason="two words" n=3') == {"event": "x", "reason": "two words", "n": "3"}


def test_removing_an_island_is_logged_without_its_token(alice, caplog):
    caplog.set_level("INFO", logger="archipelag.islands")
    island = Island.objects.create(owner=alice, host_id="alice-host-0001")
    token = island.issue_token()
    island.remove()
    assert f"event=island_removed island_id={island.pk} host_id=alice-host-0001" in caplog.text
    assert token not in caplog.text
