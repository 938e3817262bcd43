"""Log lines as data.

Events are logged as `event=name key=value ...` (logfmt), which reads well in
a terminal. With LOG_FORMAT=json each line becomes one JSON object with
those pairs as fields, for log pipelines. Secrets never reach a log line in
the first place: events name hosts, users, Islands and addresses, never a
pairing code, device secret or token.
"""

import json
import logging
import re
from typing import Any

_PAIR = re.compile(r'(?P<key>[a-z_]+)=(?P<value>"[^"]*"|\S+)')


def parse_pairs(message: str) -> dict[str, str]:
    return {match["key"]: match["value"].strip('"') for match in _PAIR.finditer(message)}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        pairs = parse_pairs(message) if message.startswith("event=") else {}
        if pairs:
            entry.update(pairs)
        else:
            entry["message"] = message
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)
