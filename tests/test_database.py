"""The database: chosen by DATABASE_URL, migrated by Alembic, and waited on cooperatively by the gevent workers."""

import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from config import Settings
from genapi.database import UPGRADE_COMMAND, database_url
from tests.conftest import ADMIN_KEY, admin_connection, make_settings
from tests.procfile import ROOT


def test_postgres_urls_get_the_psycopg_driver():
    for given in ("postgres://u:p@db.example:5432/genapi", "postgresql://u:p@db.example:5432/genapi"):
        assert database_url(make_settings(database_url=given)) == "postgresql+psycopg://u:p@db.example:5432/genapi"


def test_without_database_url_the_database_is_a_sqlite_file_in_the_instance_folder(tmp_path):
    settings = Settings(_env_file=None, api_keys="k")
    assert database_url(settings, tmp_path / "instance") == f"sqlite:///{tmp_path}/instance/genapi.sqlite3"
    assert (tmp_path / "instance").is_dir()


def test_a_sqlite_file_gets_its_migrations_at_start_up(make_app, tmp_path):
    app = make_app(database_url=f"sqlite:///{tmp_path}/fresh.sqlite3")
    response = app.test_client().get("/admin/keys", headers={"X-API-KEY": ADMIN_KEY})
    assert response.status_code == 200


def test_the_schema_check_leaves_the_migration_tool_out_of_the_process_the_workers_fork_from(tmp_path):
    # gunicorn's master loads the app and every worker forks from it: what it imports is in every process.
    script = (
        "from gevent import monkey; monkey.patch_all()\n"
        "import sys, app, sqlite3\n"
        f"tables = sqlite3.connect('{tmp_path}/fresh.sqlite3').execute(\"select name from sqlite_master\").fetchall()\n"
        "print('alembic' in sys.modules, ('alembic_version',) in tables)\n"
    )
    env = os.environ | {"API_KEYS": "k-0123456789abcdef", "OPENAI_API_KEY": "sk-test",
                        "DATABASE_URL": f"sqlite:///{tmp_path}/fresh.sqlite3"}  # fmt: skip
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    assert finished.stdout.splitlines()[-1].split() == ["False", "True"]  # after the log lines


def test_the_app_loads_no_orm_into_the_process_the_workers_fork_from(tmp_path):
    # The tables are Core tables: SQLAlchemy's ORM would be ~6 MB more in the master and so in every worker.
    script = "from gevent import monkey; monkey.patch_all()\nimport sys, app\nprint('sqlalchemy.orm' in sys.modules)\n"
    env = os.environ | {"API_KEYS": "k-0123456789abcdef", "OPENAI_API_KEY": "sk-test",
                        "DATABASE_URL": f"sqlite:///{tmp_path}/fresh.sqlite3"}  # fmt: skip
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    assert finished.stdout.splitlines()[-1] == "False"


def test_the_tables_the_code_uses_are_the_ones_the_migrations_make(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine

    from genapi.database import upgrade
    from genapi.models import metadata

    url = f"sqlite:///{tmp_path}/migrated.sqlite3"
    upgrade(url)
    engine = create_engine(url)
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), metadata) == []
    engine.dispose()


def test_a_schema_check_that_fails_unexpectedly_stops_start_up_showing_why(tmp_path):
    script = (
        "import genapi.database as database\n"
        "def broken(engine, url): raise RuntimeError('the check broke')\n"
        "database.schema_problem = broken\n"
        "import app\n"
    )
    env = os.environ | {"API_KEYS": "k-0123456789abcdef", "OPENAI_API_KEY": "sk-test",
                        "DATABASE_URL": f"sqlite:///{tmp_path}/fresh.sqlite3"}  # fmt: skip
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env)
    assert finished.returncode == 2
    assert "RuntimeError: the check broke" in finished.stderr
    assert "genapi cannot start: the check of the database's schema failed (its error is above)" in finished.stderr


def test_start_up_refuses_a_postgres_schema_that_is_behind_naming_the_command(make_app, postgres_database, capsys):
    with pytest.raises(SystemExit):
        make_app(database_url=postgres_database.url)
    assert UPGRADE_COMMAND in capsys.readouterr().err


def test_start_up_refuses_an_unreachable_database_without_showing_its_password(make_app, capsys):
    from tests.procfile import free_port

    url = f"postgresql://genapi:db-password-777@127.0.0.1:{free_port()}/genapi"
    with pytest.raises(SystemExit):
        make_app(database_url=url)
    error = capsys.readouterr().err
    assert "cannot be reached" in error
    assert "db-password-777" not in error


def test_the_procfile_release_phase_migrates_the_database_and_start_up_then_succeeds(make_app, postgres_database):
    release = next(line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("release:"))
    command = release.removeprefix("release:").split()
    environment = {"PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "DATABASE_URL": postgres_database.url}
    environment["DATABASE_URL"] = environment["DATABASE_URL"].replace("postgresql://", "postgres://")  # as Heroku sets it
    finished = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout == ""
    app = make_app(database_url=postgres_database.url)
    assert app.test_client().get("/admin/keys", headers={"X-API-KEY": ADMIN_KEY}).status_code == 200


def test_a_sqlite_file_on_a_dyno_logs_a_warning(make_app, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DYNO", "web.1")
    with caplog.at_level(logging.WARNING, logger="genapi"):
        make_app(database_url=f"sqlite:///{tmp_path}/dyno.sqlite3")
    assert any("SQLite file on a Heroku dyno" in record.getMessage() for record in caplog.records)


def create_key_through_api(url: str, name: str) -> str:
    body = json.dumps({"name": name}).encode()
    headers = {"Content-Type": "application/json", "X-API-KEY": ADMIN_KEY}
    request = urllib.request.Request(f"{url}/admin/keys", data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["key"]


def get_with_key(url: str, key: str) -> int:
    request = urllib.request.Request(f"{url}/admin/keys", headers={"X-API-KEY": key})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def waiting_on_the_lock(database_name: str, server_url: str) -> int:
    with admin_connection(server_url) as connection:
        return connection.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'", [database_name]
        ).fetchone()[0]


def test_gevent_workers_hold_many_database_waits_at_once(
    start_fake_openai, start_procfile_service, postgres_database, migrated_postgres_url
):
    upstream = start_fake_openai()
    service = start_procfile_service(
        upstream.base_url, DATABASE_URL=migrated_postgres_url, ADMIN_API_KEYS=f"root:{ADMIN_KEY}", ADMIN_RATE_LIMIT="none"
    )
    # Ten keys never looked up yet: each request's key lookup is a read of its own from the database.
    keys = [create_key_through_api(service.url, f"team-{n}") for n in range(10)]
    with ThreadPoolExecutor(10) as pool, admin_connection(migrated_postgres_url) as holder:
        with holder.transaction():
            # Every read of api_keys now waits for this lock, as it would for a slow query.
            holder.execute("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
            answers = [pool.submit(get_with_key, service.url, key) for key in keys]
            deadline = time.monotonic() + 20
            waiting = 0
            while waiting < 10 and time.monotonic() < deadline:
                waiting = waiting_on_the_lock(postgres_database.name, postgres_database.server_url)
                time.sleep(0.05)  # polling PostgreSQL's own view: there is no event to wait on
        # The lock is released: every read goes on.
        statuses = [answer.result() for answer in answers]
    # With a driver that blocked its worker, the two workers could have waited on two reads at most.
    assert waiting == 10
    assert statuses == [403] * 10  # user keys on an admin route: each one was read and identified


def test_psycopg_waits_through_gevents_poll_once_gevent_has_patched_select():
    script = (
        "from gevent import monkey; monkey.patch_all()\n"
        "import psycopg.waiting as w; print(w.wait is w.wait_poll, w.wait_conn.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "psycopg.waiting"]


def test_the_procfile_service_refuses_to_start_on_a_postgres_schema_that_is_behind(postgres_database, tmp_path):
    from tests.procfile import ProcfileService

    service = ProcfileService({"API_KEYS": "k", "DATABASE_URL": postgres_database.url}, tmp_path / "web.log")
    assert service.process.wait(30) == 2
    service.terminate()
    assert f"genapi cannot start: the database has no genapi schema yet; run `{UPGRADE_COMMAND}`" in service.output()
