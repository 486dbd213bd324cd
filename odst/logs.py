"""Structured logging: one event per line, console or JSON, with the site bound as a field."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(fmt: str = "console", level: str = "info") -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else LeanConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(lvl, logging.WARNING), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


_MISSING = object()
_QUOTED = frozenset(" \t=\r\n\"'")  # a str value with one of these is shown as repr()


class LeanConsoleRenderer:
    """structlog's ``ConsoleRenderer(colors=False)`` line, made in one pass: the same text
    (timestamp, [level], event padded to 30, then key=value sorted by key) at a fraction of
    the cost, which matters on a line per upload. A line with a traceback, a stack or a logger
    name is handed to ConsoleRenderer itself. tests/unit/test_logs.py holds the two equal."""

    _RARE = frozenset({"stack", "exception", "exc_info", "logger", "logger_name"})

    def __init__(self):
        self._full = structlog.dev.ConsoleRenderer(colors=False)
        self._level_width = next(c.formatter.width for c in self._full.columns if c.key == "level")

    def __call__(self, logger, name: str, event_dict: dict) -> str:
        if not self._RARE.isdisjoint(event_dict):
            return self._full(logger, name, event_dict)
        kvs = []
        if (ts := event_dict.pop("timestamp", _MISSING)) is not _MISSING:
            kvs.append(str(ts))
        if (level := event_dict.pop("level", _MISSING)) is not _MISSING:
            kvs.append(f"[{level}{' ' * (self._level_width - len(level))}]")
        if (event := event_dict.pop("event", _MISSING)) is not _MISSING:
            text = str(event)
            kvs.append(text + " " * (30 - len(text)))
        for key in sorted(event_dict):
            value = event_dict[key]
            if isinstance(value, str):
                kvs.append(f"{key}={repr(value) if not _QUOTED.isdisjoint(value) else value}")
            else:
                kvs.append(f"{key}={value!r}")
        return " ".join(kv for kv in kvs if kv).rstrip(" ")
