"""Structured (JSON lines) logging for the operator process."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for attr in ("k8s_skip", "object"):
            if hasattr(record, attr):
                entry[attr] = str(getattr(record, attr))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # kopf narrates every watch event at INFO; its warnings and errors are what matter here.
    logging.getLogger("kopf").setLevel(
        max(logging.getLevelName(level), logging.WARNING) if isinstance(logging.getLevelName(level), int) else logging.WARNING
    )
