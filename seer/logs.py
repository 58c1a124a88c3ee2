"""The one logging set-up of seer's commands: seer's own logger, never the root logger.

Every command (`seer knn`, `seer linear`, `seer shards`, `seer extract`, `seer eval-suite`, the tasks of
`seer launch eval`) calls ``configure_logging()`` once. It shows the INFO messages of the ``seer.*`` loggers on
stderr and leaves the root logger as it is, so another library's INFO messages stay hidden (``logging.basicConfig``
at INFO on the root logger let faiss's loader print six lines on every import). When the root logger already has a
handler (a program that configured logging itself, or pytest), seer's records go there instead of to a second
handler, so nothing is printed twice. Imports nothing from seer.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["configure_logging"]

LOGGER = "seer"


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is at the time of each record (not the stream of the moment it
    was made: a test's captured stream, closed since, would raise at the next record)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always answers sys.stderr
        pass


class _Format(logging.Formatter):
    """INFO and below: the message alone (it is the command talking); WARNING and above: level and logger first."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname} {record.name}: {text}"
        return text


def configure_logging(level: int = logging.INFO) -> logging.Logger:
    """Show seer's log records of ``level`` and above on stderr; other loggers (the root logger included) are left
    alone. Idempotent: a second call changes the level only. Returns the ``seer`` logger."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(level)
    ours = [h for h in logger.handlers if isinstance(h, _Stderr)]
    if not ours and not logging.getLogger().handlers:
        handler = _Stderr()
        handler.setFormatter(_Format())
        logger.addHandler(handler)
    return logger
