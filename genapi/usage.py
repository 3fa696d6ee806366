"""The usage ledger: one row per request that reached the model or the cache, written in batches off the request path.

`Ledger.record()` only appends to a bounded buffer in memory; a writer (a thread, so a greenlet under gevent) writes
what has gathered every USAGE_FLUSH_SECONDS, in one INSERT. While the database is away the rows wait and are written
when it is back; past USAGE_BUFFER_ROWS the oldest are dropped, logged and counted in
genapi_usage_rows_dropped_total. Nothing of it can fail a request. On a graceful shutdown (SIGTERM) gunicorn's
worker_exit hook, or atexit outside gunicorn, writes what is left; a SIGKILL loses at most the rows of the last
USAGE_FLUSH_SECONDS. GET /v1/usage, below, is a key's own totals.
"""

import atexit
import collections
import csv
import functools
import io
import logging
import os
import threading
import weakref
from datetime import date, datetime, time, timedelta

from typing import Literal

from flask import Blueprint, current_app, g, jsonify, request
from pydantic import BaseModel, Field
from sqlalchemy import func, insert, select
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from genapi import metrics
from genapi.auth import authenticate
from genapi.budget_periods import period_bounds
from genapi.budgets import budgets
from genapi.errors import ApiError
from genapi.keys import utc_now
from genapi.models import usage_ledger

log = logging.getLogger("genapi")

BATCH_ROWS = 1000  # rows in one INSERT; a backlog after an outage is written a batch at a time
DEFAULT_RANGE_DAYS = 30
GROUPS = ("key", "model", "day")
_LEDGERS: "weakref.WeakSet[Ledger]" = weakref.WeakSet()  # every ledger of this process, for the shutdown flush


class Ledger:
    """A bounded buffer of usage rows and the writer that moves them to the database."""

    def __init__(self, database, flush_seconds: float, buffer_rows: int):
        self._database = database
        self._flush_seconds = flush_seconds
        self._rows: collections.deque = collections.deque()
        self._bound = buffer_rows
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._writer: threading.Thread | None = None
        self._writer_pid: int | None = None
        self._dropped_unlogged = 0
        self._database_away = False
        _LEDGERS.add(self)

    def __repr__(self) -> str:
        return f"Ledger({len(self._rows)} rows waiting)"

    @property
    def waiting(self) -> int:
        return len(self._rows)

    def record(
        self, *, request_id: str, key_name: str, key_id: str | None, route: str, model: str, prompt_tokens: int,
        completion_tokens: int, status: int, duration_ms: float, estimated: bool = False, cached: bool = False,
        error_code: str | None = None, upstream_ms: float | None = None, at: datetime | None = None,
    ) -> None:
        """Add one request's row; it reaches the database within USAGE_FLUSH_SECONDS. Never blocks on the database.

        A streaming route calls this once its stream has ended, however it ended, with `estimated=True` when it
        counted the tokens itself.
        """
        row = {
            "at": at or utc_now(), "request_id": request_id, "key_id": key_id, "key_name": key_name, "route": route,
            "model": model, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "estimated": estimated, "cached": cached, "status": status, "error_code": error_code,
            "duration_ms": round(duration_ms, 2), "upstream_ms": round(upstream_ms, 2) if upstream_ms is not None else None,
        }
        with self._lock:
            self._append(row)
        self._start_writer()

    def _append(self, row: dict) -> None:
        if len(self._rows) >= self._bound:
            self._rows.popleft()
            self._dropped_unlogged += 1
            metrics.count_usage_dropped()
        self._rows.append(row)

    def _start_writer(self) -> None:
        """The writer of this process: started by the first row, and again in a forked worker, whose copy has none."""
        if self._writer_pid == os.getpid() or self._closing:
            return
        with self._lock:
            if self._writer_pid == os.getpid():
                return
            self._writer_pid = os.getpid()
            self._writer = threading.Thread(target=self._run, name="genapi-usage-writer", daemon=True)
            self._writer.start()

    def _run(self) -> None:
        while not self._closing:
            self._wake.wait(self._flush_seconds)
            self._wake.clear()
            self.flush()

    def flush(self) -> bool:
        """Write every waiting row, a batch at a time; False if the database failed (the rows wait for the next try)."""
        self._log_drops()
        while True:
            with self._lock:
                batch = [self._rows.popleft() for _ in range(min(BATCH_ROWS, len(self._rows)))]
            if not batch:
                return True
            try:
                with self._database.engine.begin() as connection:
                    write_rows(connection, batch)
            except SQLAlchemyError as error:
                with self._lock:  # back in front, in order; rows that arrived since may push the oldest out
                    for row in reversed(batch):
                        self._rows.appendleft(row)
                    while len(self._rows) > self._bound:
                        self._rows.popleft()
                        self._dropped_unlogged += 1
                        metrics.count_usage_dropped()
                if not self._database_away:
                    self._database_away = True
                    log.warning(
                        "usage ledger: the database is unreachable (%s); %d rows wait in memory and are written when "
                        "it is back", type(error).__name__, len(self._rows),
                    )
                return False
            if self._database_away:
                self._database_away = False
                log.warning("usage ledger: the database is reachable again; writing the rows that waited")

    def _log_drops(self) -> None:
        with self._lock:
            dropped, self._dropped_unlogged = self._dropped_unlogged, 0
        if dropped:
            log.warning(
                "usage ledger: %d rows dropped, the oldest, because more than USAGE_BUFFER_ROWS (%d) waited for the "
                "database", dropped, self._bound,
            )

    def close(self) -> None:
        """Stop the writer and write what is left (on a graceful shutdown)."""
        self._closing = True
        self._wake.set()
        writer = self._writer
        if writer is not None and self._writer_pid == os.getpid() and writer.is_alive():
            writer.join(timeout=10)
        if self._rows and not self.flush():
            log.error("usage ledger: %d rows could not be written at shutdown: the database is unreachable", len(self._rows))


def write_rows(connection, batch: list[dict]) -> None:
    """One batch of rows in one statement: COPY on PostgreSQL, a multi-row INSERT elsewhere.

    COPY because psycopg formats its rows in C: under gevent its executemany cost a worker eight times COPY's CPU per
    row, about a twentieth of what a request costs in all.
    """
    if connection.dialect.name != "postgresql":
        connection.execute(insert(usage_ledger), batch)
        return
    from psycopg import Error, sql

    columns = [column.name for column in usage_ledger.columns if column.name != "id"]
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(usage_ledger.name), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    try:
        with connection.connection.driver_connection.cursor() as cursor, cursor.copy(statement) as copy:
            for row in batch:
                copy.write_row([row[column] for column in columns])
    except Error as error:  # the driver's own, since COPY goes past SQLAlchemy: made SQLAlchemy's like the rest
        raise DBAPIError.instance("COPY usage", None, error, Error) from error


def close_all() -> None:
    """Flush every ledger of this process: gunicorn's worker_exit hook calls it, and atexit otherwise."""
    for ledger in list(_LEDGERS):
        if not ledger._closing:
            ledger.close()


atexit.register(close_all)


def record_request(status: int, seconds: float) -> None:
    """The finished request's row, if it reached the model or the cache (its view set g.usage_model)."""
    model = g.get("usage_model")
    client = g.get("client")
    if model is None or client is None:
        return
    completion = g.get("completion")
    current_app.extensions["genapi"]["ledger"].record(
        request_id=g.request_id, key_name=client.name, key_id=client.key_id, route=request.url_rule.rule,
        model=completion.model if completion else model,  # the model that answered, as the answer names it
        prompt_tokens=completion.prompt_tokens if completion else 0,
        completion_tokens=completion.completion_tokens if completion else 0,
        cached=g.get("cached", False), status=status, error_code=g.get("error_code"), duration_ms=seconds * 1000,
        upstream_ms=completion.upstream_ms if completion else None,
    )


def stream_usage_recorder():
    """For a stream's relay, built in its view: the ledger's record() with this request's own fields, for the relay
    to call once, when the stream has ended, with what the stream used. None when the request has no usage row."""
    client = g.get("client")
    if g.get("usage_model") is None or client is None:
        return None
    return functools.partial(
        current_app.extensions["genapi"]["ledger"].record,
        request_id=g.request_id, key_name=client.name, key_id=client.key_id, route=request.url_rule.rule,
        cached=g.get("cached", False),
    )


# Reading it: totals over a range of days, grouped.


class UsageTotals(BaseModel):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageLine(UsageTotals):
    """One group's totals; only the fields of the groups asked for are present."""

    key_name: str | None = None
    key_id: str | None = None
    model: str | None = None
    day: str | None = None


class UsageReport(BaseModel):
    """Requests and tokens from start to end (UTC days, both included); a cached answer counts no tokens."""

    start: str
    end: str
    group_by: list[Literal["key", "model", "day"]]
    data: list[UsageLine]
    totals: UsageTotals


class BudgetView(BaseModel):
    """Where the calling key's token budget stands now."""

    limit: int = Field(description="The budget's tokens per period.")
    period: Literal["minute", "hour", "day", "month"] = Field(description="Its calendar period, in UTC.")
    remaining: int | None = Field(description="Tokens left this period, after what requests in flight hold; null "
                                  "while Redis cannot be read.")
    reset: int = Field(description="When the period ends and the budget resets, as Unix time (X-Budget-Reset).")


class OwnUsage(UsageReport):
    """What GET /v1/usage answers with: the calling key's own usage, by day and model, and its token budget."""

    key_name: str
    key_id: str | None
    budget: BudgetView | None = Field(description="The key's token budget now; null when it has none.")


def day_range() -> tuple[date, date]:
    """?start=YYYY-MM-DD&end=YYYY-MM-DD, both included (UTC days): by default the 30 days up to end, or from start.

    A start after the end is an empty range, not an error.
    """
    try:
        start = date.fromisoformat(request.args["start"]) if "start" in request.args else None
        end = date.fromisoformat(request.args["end"]) if "end" in request.args else None
    except ValueError:
        raise invalid_query("start", "start and end must be dates, YYYY-MM-DD") from None
    span = timedelta(DEFAULT_RANGE_DAYS - 1)
    if end is None:
        end = utc_now().date() if start is None else min(start, date.max - span) + span
    if start is None:
        start = max(end, date.min + span) - span
    return start, end


def invalid_query(param: str, message: str) -> ApiError:
    return ApiError(422, f"Invalid request: {param}: {message}", code="validation_error", param=param,
                    fields=[{"param": param, "message": message}])


def totals(engine, start: date, end: date, group_by: tuple[str, ...], key_name: str | None = None,
           key_id: str | None = None, only_key: bool = False) -> dict:
    """Requests and tokens from start to end (UTC days, both included), grouped by key, model and/or day."""
    ledger = usage_ledger.c
    day = func.date(ledger.at)
    columns = {"key": [ledger.key_name, ledger.key_id], "model": [ledger.model], "day": [day]}
    grouped = [column for group in GROUPS if group in group_by for column in columns[group]]
    shown = [day.label("day") if column is day else column for column in grouped]
    query = select(
        *shown,
        func.count().label("requests"),
        func.coalesce(func.sum(ledger.prompt_tokens), 0).label("prompt_tokens"),
        func.coalesce(func.sum(ledger.completion_tokens), 0).label("completion_tokens"),
    ).where(ledger.at >= datetime.combine(start, time()), ledger.at <= datetime.combine(end, time.max))
    if only_key:  # one key: a database key by its id, a key from API_KEYS by its name
        query = query.where(ledger.key_id == key_id) if key_id else query.where(
            ledger.key_name == key_name, ledger.key_id.is_(None)
        )
    if grouped:
        query = query.group_by(*grouped).order_by(*grouped)
    data = []
    with engine.connect() as connection:
        for row in connection.execute(query).mappings():
            item = {}
            if "key" in group_by:
                item |= {"key_name": row["key_name"], "key_id": row["key_id"]}
            if "model" in group_by:
                item["model"] = row["model"]
            if "day" in group_by:
                item["day"] = str(row["day"])
            requests, prompt, completion = row["requests"], int(row["prompt_tokens"]), int(row["completion_tokens"])
            item |= {"requests": requests, "prompt_tokens": prompt, "completion_tokens": completion,
                     "total_tokens": prompt + completion}
            if requests:
                data.append(item)
    summed = {name: sum(item[name] for item in data) for name in ("requests", "prompt_tokens", "completion_tokens", "total_tokens")}
    return {"start": start.isoformat(), "end": end.isoformat(), "group_by": list(g for g in GROUPS if g in group_by),
            "data": data, "totals": summed}


def as_csv(report: dict) -> str:
    columns = []
    if "key" in report["group_by"]:
        columns += ["key_name", "key_id"]
    columns += [group for group in ("model", "day") if group in report["group_by"]]
    columns += ["requests", "prompt_tokens", "completion_tokens", "total_tokens"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(report["data"])
    return out.getvalue()


usage_api = Blueprint("usage", __name__, url_prefix="/v1")


@usage_api.get("/usage")
def own_usage():
    """GET /v1/usage: the calling key's own requests and tokens by day and model."""
    client = authenticate()
    start, end = day_range()
    engine = current_app.extensions["genapi"]["database"].engine
    report = totals(engine, start, end, ("model", "day"), client.name, client.key_id, only_key=True)
    return jsonify({"key_name": client.name, "key_id": client.key_id} | report | {"budget": budget_view(client)})


def budget_view(client) -> dict | None:
    """The key's budget as it stands, as the X-Budget-* headers would say it; None when it has no budget."""
    budget = budgets().of(client)
    if budget is None:
        return None
    state = budgets().state(client)  # None while Redis cannot be read
    reset = state.reset_at if state else period_bounds(budget.period, datetime.now().timestamp())[1]
    return {"limit": budget.tokens, "period": budget.period, "remaining": state.remaining if state else None,
            "reset": reset}
