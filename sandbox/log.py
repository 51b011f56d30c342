"""structlog on top of stdlib logging: a library must not print on its own,
so events go to the "sandbox" logger (silent below WARNING unless the
embedding program or the CLI configures it). One event per step, with fields."""
from __future__ import annotations

import logging
import sys

import structlog

_PROCESSORS = [
    structlog.stdlib.filter_by_level,   # first: a disabled level costs nothing more
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
]


def get_logger(name: str = "sandbox"):
    return structlog.wrap_logger(logging.getLogger(name), processors=_PROCESSORS,
                                 wrapper_class=structlog.stdlib.BoundLogger)


def configure(fmt: str = "console", debug: bool = False, stream=None) -> None:
    """Human-readable on a terminal, JSON lines otherwise or when asked."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processor=renderer, foreign_pre_chain=[structlog.stdlib.add_log_level]))
    root = logging.getLogger("sandbox")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.events: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, dict):
            self.events.append(dict(record.msg))


class capture_logs:
    """`with capture_logs() as events:` every event dict logged under "sandbox"
    meanwhile (for tests; the counterpart of structlog.testing.capture_logs)."""

    def __enter__(self) -> list[dict]:
        self._logger = logging.getLogger("sandbox")
        self._handler = _Capture()
        self._level = self._logger.level
        self._logger.addHandler(self._handler)
        self._logger.setLevel(logging.DEBUG)
        return self._handler.events

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._level)
