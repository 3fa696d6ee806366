"""The database: its URL, its engine, and the check that its schema is the one this code expects.

DATABASE_URL picks it; without one it is a SQLite file in the app's instance folder. Heroku Postgres writes its URL
as postgres://, which SQLAlchemy no longer reads: every PostgreSQL URL is given the psycopg (3) driver here.
"""

import contextlib
import json
import logging
import os
import sys
import tempfile
import threading
import traceback
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.engine import make_url

from config import Settings

log = logging.getLogger("genapi")

ROOT = Path(__file__).resolve().parent.parent
UPGRADE_COMMAND = "flask --app app db upgrade"
DEFAULT_FILE = "genapi.sqlite3"


def database_url(settings: Settings, instance_path: str | Path = ROOT / "instance") -> str:
    """DATABASE_URL with the psycopg driver named, or the default SQLite file in the instance folder."""
    url = settings.database_url.get_secret_value() if settings.database_url else None
    if not url:
        Path(instance_path).mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{Path(instance_path) / DEFAULT_FILE}"
    for scheme in ("postgres://", "postgresql://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url.removeprefix(scheme)
    return url


def build_engine(url: str) -> Engine:
    """An engine whose connections fail fast when the database is away, and are checked before each use."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 5})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        url,
        pool_pre_ping=True,  # a connection the server closed (a restart, a failover) is replaced, not used
        pool_size=5,
        max_overflow=5,
        pool_timeout=5,
        # A database that is away must cost a request seconds at most, never Heroku's 30.
        connect_args={"connect_timeout": 2, "options": "-c statement_timeout=5000"},
    )


def _sqlite_pragmas(connection, _record) -> None:
    # WAL lets the readers of one worker go on while another worker writes; busy_timeout waits out a writer.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def alembic_config(url: str):
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["url"] = url
    return config


def schema_problem(engine: Engine, url: str) -> str | None:
    """Why the database's schema is not the one this code expects (behind, or from a newer release), or None."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    migration_log = logging.getLogger("alembic.runtime.migration")
    level = migration_log.level
    migration_log.setLevel(logging.WARNING)  # a look is not a migration: no "Context impl ..." lines for it
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    finally:
        migration_log.setLevel(level)
    if current == head:
        return None
    if current is None:
        return f"the database has no genapi schema yet; run `{UPGRADE_COMMAND}`"
    return f"the database's schema is at {current}, this release needs {head}; run `{UPGRADE_COMMAND}`"


def upgrade(url: str) -> None:
    """Apply every migration the database has not had yet (what `flask --app app db upgrade` runs)."""
    from alembic import command

    command.upgrade(alembic_config(url), "head")


class Database:
    """The engine of one app: built once in create_app, shared by its workers after the fork."""

    def __init__(self, url: str):
        self.url = url
        self.engine = build_engine(url)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @property
    def safe_url(self) -> str:
        """The URL without its password, for logs."""
        return make_url(self.url).render_as_string(hide_password=True)

    def __repr__(self) -> str:
        return f"Database({self.safe_url})"


def prepare(database: Database) -> None:
    """Before serving: a SQLite file gets its migrations; any other database must already have them.

    A SQLite file belongs to this one machine, so there is no release phase to wait for, and a fresh clone runs at
    once. PostgreSQL is shared by every instance and is migrated once, by the Procfile's release phase.
    """
    if os.environ.get("DYNO") and database.is_sqlite:
        log.warning(
            "DATABASE_URL is a SQLite file on a Heroku dyno, whose disk every restart wipes: keys made through the "
            "admin API and the usage ledger will be lost; add Heroku Postgres (heroku addons:create heroku-postgresql)"
        )
    problem = in_child_process(lambda: schema_brought_up(database))
    if problem:
        print(f"genapi cannot start: {problem}", file=sys.stderr, flush=True)
        raise SystemExit(2)


def schema_brought_up(database: Database) -> str | None:
    """The schema checked, and a SQLite file's migrated; what is still wrong with it, or None."""
    try:
        problem = schema_problem(database.engine, database.url)
        if problem and database.is_sqlite:
            upgrade(database.url)
            problem = schema_problem(database.engine, database.url)
    except SQLAlchemyError as error:
        problem = f"the database at {database.safe_url} cannot be reached ({type(error).__name__})"
    finally:
        database.engine.dispose()  # no connection of the check's may outlive it
    return problem


def in_child_process(check) -> str | None:
    """check()'s answer (a text or None), worked out in a forked child process.

    The check needs alembic, ~10 MB of modules and data: loaded in gunicorn's master, which every worker forks
    from, they would stay in the memory of every process, though nothing serves a request with them. The child
    writes its answer to a file (a pipe's end can outlive the child here, in a process patched by gevent) and
    exits; the parent waits for it with the unpatched waitpid, since gevent's hub is not running yet.

    A process that already runs other threads (a test run, an app built twice) checks in place instead: a forked
    child of it can hang on a lock that one of those threads held at the fork.
    """
    if threading.active_count() > 1:
        return check()
    waitpid = os.waitpid
    if "gevent" in sys.modules:
        from gevent import monkey

        if monkey.is_module_patched("os"):
            waitpid = monkey.get_original("os", "waitpid")
    with tempfile.TemporaryFile() as answer:
        child = os.fork()
        if child == 0:  # the child: answer, and leave without running anything of the parent's at exit
            status = 0
            try:
                answer.write(json.dumps({"problem": check()}).encode())
                answer.flush()
            except BaseException:  # noqa: BLE001 - whatever it is, the parent reports it
                traceback.print_exc()
                status = 1
            finally:
                sys.stderr.flush()
                os._exit(status)
        with contextlib.suppress(ChildProcessError):  # reaped already: the answer file says how it went
            waitpid(child, 0)
        answer.seek(0)
        try:
            return json.loads(answer.read())["problem"]
        except (ValueError, KeyError):
            return "the check of the database's schema failed (its error is above)"
