"""Logging set-up: every line of a request carries its X-Request-ID, and one record is one line.

Log lines carry what callers sent (a path, a user id): a caller who puts a newline in it must
not be able to write a line of their own. The formatters escape control characters once, for
every record, rather than each call site escaping its own arguments:

- ``text``: ``time level logger [request id] message``; control characters in the message
  and the request id become ``\\n``, ``\\x1b``, ...; a traceback keeps its lines, each
  indented, so that only a record's own first line starts at the left margin.
- ``json``: one JSON object a line (time, level, logger, request_id, message, and exc_info
  when there is one); JSON escapes the control characters itself.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TextIO

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")
LOG_FORMATS = ("text", "json")

# C0 and C1 controls, DEL, the Unicode line and paragraph separators, and lone surrogates
# (which cannot be written as UTF-8 at all).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    short = _SHORT.get(char)
    if short is not None:
        return short
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with every control character written as an escape: one line, printable."""
    return _UNSAFE.sub(_escape_one, text)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):  # the access log passes its own
            record.request_id = REQUEST_ID.get()
        return True


class TextFormatter(logging.Formatter):
    """``time level logger [request id] message``, one line per record but for tracebacks.

    The access log writes one record per request, so the line is put together directly
    rather than through a copy of the record and a %-format, and the time's text is made
    once per second (logging's own ``formatTime`` runs ``strftime`` for every record).
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        self._second: int | None = None
        self._second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._second_text},{int(record.msecs):03d}"  # logging's default_msec_format

    def format(self, record: logging.LogRecord) -> str:
        # logging.Formatter.format, less its cache of the traceback on the record
        # (record.exc_text): another handler may have cached it unindented.
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        if record.exc_info:
            text += "\n" + _indented(self.formatException(record.exc_info))
        elif record.exc_text:
            text += "\n" + _indented(record.exc_text)
        if record.stack_info:
            text += "\n" + _indented(self.formatStack(record.stack_info))
        return text

    def formatMessage(self, record: logging.LogRecord) -> str:
        # The record itself is left as it is: other handlers may read it after this one.
        request_id = escape(str(getattr(record, "request_id", "-")))
        return (
            f"{record.asctime} {record.levelname} {record.name} [{request_id}] "
            f"{escape(record.message)}"
        )


def _indented(text: str) -> str:
    # Each line of a traceback escaped on its own and indented: an exception's message may
    # carry a caller's text, and none of its lines may look like a record of its own.
    return "\n".join("    " + escape(line) for line in text.splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, request_id, message[, exc_info]."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "request_id": str(getattr(record, "request_id", "-")),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        # ensure_ascii: control characters and lone surrogates come out as \u escapes.
        return json.dumps(entry, ensure_ascii=True)


def make_handler(log_format: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """A stream handler (stderr by default) with the request id and the chosen format."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format={log_format!r} must be one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    return handler


def configure_logging(level: str, log_format: str = "text", stream: TextIO | None = None) -> None:
    """Root logging to stderr, one record a line, in ``text`` or ``json``.

    Neither format shows where a call was made from, nor its thread or process, so records
    do not gather them: the Logging HOWTO's "Optimization" settings. Each is a stack walk or
    a lookup paid by every record, one per request with the access log.
    """
    logging._srcfile = None  # type: ignore[attr-defined]  # no caller's file and line
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers = [make_handler(log_format, stream)]
    root.setLevel(level)
