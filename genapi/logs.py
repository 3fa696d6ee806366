"""Logs as one JSON object per line on stdout: the request line, the start-up line and every other record.

A 20-line formatter instead of a logging library: each line costs one json.dumps, inside the per-request CPU budget.
"""

import json
import logging
import os
import re
import sys
import time
from datetime import datetime, timezone
from urllib.parse import urlsplit

from flask import g, request
from pydantic import SecretStr

from genapi.pid import current_pid

request_log = logging.getLogger("genapi.request")

# A request id from outside (a client's X-Request-ID, an upstream's) is kept only if it is short and plain, so it
# cannot smuggle anything into our logs.
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def sane_request_id(value) -> str | None:
    """The id if it is short and plain, else None."""
    return value if isinstance(value, str) and SANE_REQUEST_ID.fullmatch(value) else None


class JsonFormatter(logging.Formatter):
    """time, level, logger and message, then the record's `fields` (extra={"fields": {...}}), as one JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout (or sys.stderr) is when the line is written, so test capture sees it."""

    to_stderr = False  # a command-line tool (`flask keys create`) keeps stdout for its result

    @property
    def stream(self):
        return sys.stderr if self.to_stderr else sys.stdout

    @stream.setter
    def stream(self, _ignored):
        pass


def configure_logging(level: str, to_stderr: bool = False) -> None:
    """Send every log record, ours and the libraries', to stdout (or stderr) as JSON, at the given level.

    Safe to call twice; the last call says where the lines go.
    """
    root = logging.getLogger()
    root.setLevel(level)
    # No line shows the caller's file and line, so logging need not walk the stack for them on every record (the
    # logging HOWTO's "Optimization"; gunicorn's own format uses the process id, which stays).
    logging._srcfile = None
    # httpx2 logs every upstream call at INFO, which the request line already says: one line per request, not two.
    logging.getLogger("httpx2").setLevel("WARNING" if level == "INFO" else level)
    # alembic names each of its plugins as it loads them, a line each, at every start-up.
    logging.getLogger("alembic.runtime.plugins").setLevel("WARNING" if level == "INFO" else level)
    handler = next((handler for handler in root.handlers if isinstance(handler, StdoutHandler)), None)
    if handler is None:
        handler = StdoutHandler()
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
    handler.to_stderr = to_stderr


def log_request(status: int, seconds: float, log_prompts: bool) -> None:
    """The request's one line, from what it left on `g`; prompts and outputs only with LOG_PROMPTS=true."""
    client = g.get("client")
    completion = g.get("completion")
    fields = {
        "request_id": g.get("request_id"),
        "key_name": client.name if client else None,
        "method": request.method,
        "path": request.path,  # never the query string, where a careless client may have put its key
        "status": status,
        "error_code": g.get("error_code"),
        "duration_ms": round(seconds * 1000, 2),
        "upstream_ms": round(completion.upstream_ms, 2) if completion else None,
        "prompt_tokens": completion.prompt_tokens if completion else None,
        "completion_tokens": completion.completion_tokens if completion else None,
        "cached": g.get("cached", False),
        "upstream_request_id": completion.upstream_request_id if completion else None,
        "pid": current_pid(),
    }
    if log_prompts and "exchange" in g:  # a batch's are lists, a prompt each
        fields |= g.exchange
    level = logging.ERROR if status >= 500 else logging.INFO
    request_log.log(level, "%s %s %s", request.method, request.path, status, extra={"fields": fields})


def stream_record(log_prompts: bool) -> dict:
    """What a stream's log line takes from its request, captured in the view: the stream is logged after the request.

    `started` and `route` are for StreamRelay's own use; `exchange` is there only with LOG_PROMPTS=true.
    """
    client = g.get("client")
    record = {
        "request_id": g.get("request_id"),
        "key_name": client.name if client else None,
        "method": request.method,
        "path": request.path,
        "cached": g.get("cached", False),
        "pid": current_pid(),
        "started": g.get("started", time.perf_counter()),
        "route": request.url_rule.rule if request.url_rule else None,
    }
    if log_prompts and "exchange" in g:
        record["exchange"] = dict(g.exchange)
    return record


def log_stream(fields: dict, level: int) -> None:
    """A stream's one line, at its end: the request's fields, then how the stream went and ended."""
    request_log.log(level, "%s %s %s %s", fields["method"], fields["path"], fields["status"], fields["stream_ending"],
                    extra={"fields": fields})


def effective_configuration(settings) -> dict:
    """Every setting, for the start-up line: secrets only as set or not, URLs only as their host."""
    shown = {}
    for name, value in settings:
        if name.endswith("_url"):  # a URL may carry a password (REDIS_URL does on Heroku): its host is enough
            value = value.get_secret_value() if isinstance(value, SecretStr) else value
            value = urlsplit(value).hostname if value else None
        elif isinstance(value, SecretStr):
            value = "***" if value.get_secret_value() else None
        shown[name] = value
    if shown.get("openai_base_url") is None and settings.llm_provider == "openai":
        shown["openai_base_url"] = "api.openai.com"
    return shown


def log_start_up(settings) -> None:
    """One line with the effective configuration, written once when the server is ready."""
    logging.getLogger("genapi").info(
        "genapi started", extra={"fields": {"pid": os.getpid(), "configuration": effective_configuration(settings)}}
    )
