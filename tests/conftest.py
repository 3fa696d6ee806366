"""Fixtures: apps built from explicit settings, an upstream mocked at the SDK's transport, a loopback fake server."""

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid

import httpx2
import pytest
import redis

# app.py builds a module-level app at import for gunicorn; give that import a known environment, not the caller's.
GENAPI_PREFIXES = ("OPENAI_", "LLM_", "API_KEYS", "ALLOWED_MODELS", "MAX_", "ADMIN_", "RATE_LIMIT", "AUTH_", "REDIS_")
GENAPI_PREFIXES += ("CACHE_", "BATCH_", "TRUSTED_PROXIES", "CORS_", "DATABASE_URL", "KEY_CACHE_", "USAGE_", "DYNO")
for variable in [v for v in os.environ if v.startswith(GENAPI_PREFIXES)]:
    del os.environ[variable]
os.environ["API_KEYS"] = "import-time-key-not-used-by-tests"
# Tests that do not look at the database share one SQLite file of this run's own, never the instance folder's;
# those that do get a database of their own (the `database_url` fixture).
SHARED_TEST_DATABASE_URL = f"sqlite:///{tempfile.mkdtemp(prefix='genapi-test-db-')}/shared.sqlite3"
os.environ["DATABASE_URL"] = SHARED_TEST_DATABASE_URL

from app import create_app  # noqa: E402
from config import Settings  # noqa: E402
from tests.fake_openai import FakeOpenAI, completion_body  # noqa: E402
from tests.procfile import ProcfileService, free_port  # noqa: E402

del os.environ["API_KEYS"]
del os.environ["DATABASE_URL"]

USER_KEY = "test-user-key-0123456789"
ADMIN_KEY = "test-admin-key-9876543210"
# The Redis that the machine or .ci/run starts; shared with other test runs, so each test keeps to its own prefix.
SHARED_REDIS_URL = os.environ.get("GENAPI_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
UPSTREAM_KEY = "sk-upstream-secret-abcdef987654"


def make_settings(**overrides) -> Settings:
    values = {
        "api_keys": f"alice:{USER_KEY}",
        "admin_api_keys": f"root:{ADMIN_KEY}",
        "llm_provider": "openai",
        "openai_api_key": UPSTREAM_KEY,
        "openai_base_url": "http://upstream.test/v1",
        "openai_model": "test-model",
        "openai_max_retries": 0,
        "openai_timeout": 5,
        "database_url": SHARED_TEST_DATABASE_URL,
    }
    return Settings(_env_file=None, **(values | overrides))


class MockUpstream:
    """The SDK's transport, scripted: each call pops the next handler, then answers with a good completion."""

    def __init__(self):
        self.script = []
        self.requests: list[httpx2.Request] = []

    def then(self, *answers):
        """Each answer is an httpx2.Response, an exception to raise, or a callable taking the request."""
        self.script.extend(answers)
        return self

    @property
    def calls(self) -> int:
        return len(self.requests)

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        answer = self.script.pop(0) if self.script else None
        if answer is None:
            return self.ok(request)
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return answer(request)
        return answer

    def ok(self, request: httpx2.Request) -> httpx2.Response:
        """The good completion, echoing the prompt, that answers any call nothing else was scripted for."""
        return httpx2.Response(200, json=completion_body(json.loads(request.content), self.calls))

    def http_client(self) -> httpx2.Client:
        return httpx2.Client(transport=httpx2.MockTransport(self.handle))


@pytest.fixture
def upstream() -> MockUpstream:
    return MockUpstream()


@pytest.fixture
def make_app(upstream):
    """Build an app whose upstream is the mocked transport; keyword arguments override settings."""

    apps = []

    def build(**overrides):
        app = create_app(make_settings(**overrides), http_client=upstream.http_client())
        app.config["TESTING"] = True
        apps.append(app)
        return app

    yield build
    for app in apps:  # write each app's usage rows, and stop its writer, before its database goes away
        app.extensions["genapi"]["ledger"].close()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def generate(client):
    """POST /generate with the user key; keyword arguments go into the JSON body."""

    def post(headers=None, **body):
        body.setdefault("prompt", "Tell me a joke.")
        return client.post("/generate", json=body, headers={"X-API-KEY": USER_KEY} | (headers or {}))

    return post


@pytest.fixture(scope="session")
def fake_openai_server() -> FakeOpenAI:
    return FakeOpenAI().start_in_thread()


@pytest.fixture
def fake_openai(fake_openai_server) -> FakeOpenAI:
    """The loopback fake OpenAI server, with a clean script for this test."""
    fake_openai_server.reset()
    yield fake_openai_server
    fake_openai_server.reset()


@pytest.fixture(scope="session")
def shared_redis_url() -> str:
    """The shared test Redis; its tests skip when it is not running, and fail instead under GENAPI_REQUIRE_REDIS=1."""
    try:
        redis.Redis.from_url(SHARED_REDIS_URL, socket_connect_timeout=1, socket_timeout=1).ping()
    except redis.RedisError as error:
        redis_missing(f"Redis is not reachable at {SHARED_REDIS_URL} ({type(error).__name__}); start it (see .ci/run)")
    return SHARED_REDIS_URL


def redis_missing(reason: str) -> None:
    if os.environ.get("GENAPI_REQUIRE_REDIS") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def redis_settings(shared_redis_url):
    """Settings that put this test's rate counts and cache in the shared Redis, under a prefix of its own."""
    prefix = f"genapi-test-{uuid.uuid4().hex[:12]}:"
    yield {"redis_url": shared_redis_url, "redis_key_prefix": prefix}
    connection = redis.Redis.from_url(shared_redis_url)
    keys = list(connection.scan_iter(match=f"{prefix}*"))
    if keys:
        connection.delete(*keys)


class PrivateRedis:
    """A redis-server of this test's own, on a free port, that the test may stop: the shared one is never stopped."""

    PASSWORD = "private-redis-password-4242"  # so tests can check that no log shows it

    def __init__(self):
        self.port = free_port()
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            + ["--requirepass", self.PASSWORD],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://:{self.PASSWORD}@127.0.0.1:{self.port}/0"
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 60  # generous, for a busy machine
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)  # polling for the server to listen: there is no event to wait on
        self.stop()
        raise AssertionError("the private redis-server did not start")

    def client(self) -> redis.Redis:
        """A connection of the test's own, to reconfigure this server (CONFIG SET, REPLICAOF)."""
        return redis.Redis.from_url(self.url, socket_timeout=2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def private_redis():
    """A Redis that this test can take away mid-run."""
    if shutil.which("redis-server") is None:
        redis_missing("redis-server is not installed (apt-get install redis-server)")
    server = PrivateRedis()
    yield server
    server.stop()


@pytest.fixture
def start_fake_openai():
    """Start a fresh fake OpenAI server that answers after `delay` seconds, with in-flight counters of its own."""

    def start(delay: float = 0.0) -> FakeOpenAI:
        return FakeOpenAI(delay=delay).start_in_thread()

    return start


@pytest.fixture
def start_procfile_service(tmp_path):
    """Start the Procfile's web line against an upstream base URL, healthy; each is stopped after the test."""
    services = []

    def start(base_url: str, **env) -> ProcfileService:
        environment = {
            "API_KEYS": f"alice:{USER_KEY}",
            "OPENAI_API_KEY": UPSTREAM_KEY,
            "OPENAI_BASE_URL": base_url,
            "OPENAI_MODEL": "fake-model",
            "DATABASE_URL": f"sqlite:///{tmp_path}/web-{len(services)}.sqlite3",
        }
        service = ProcfileService(environment | env, tmp_path / f"web-{len(services)}.log")
        services.append(service)
        service.wait_until_healthy()
        return service

    yield start
    for service in services:
        service.terminate()


# PostgreSQL: the machine's (or .ci/run's) at 127.0.0.1:5432, trust auth. Shared with other test runs, so each test
# creates a database of its own, genapi_test_<random>, and drops only that one.
SHARED_POSTGRES_URL = os.environ.get("GENAPI_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def postgres_missing(reason: str) -> None:
    if os.environ.get("GENAPI_REQUIRE_POSTGRES") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def admin_connection(server_url: str):
    import psycopg

    return psycopg.connect(server_url, autocommit=True, connect_timeout=2)


@pytest.fixture(scope="session")
def shared_postgres_url() -> str:
    """The shared test PostgreSQL; its tests skip when it is not running, and fail under GENAPI_REQUIRE_POSTGRES=1."""
    import psycopg

    try:
        admin_connection(SHARED_POSTGRES_URL).close()
    except psycopg.Error as error:
        postgres_missing(f"PostgreSQL is not reachable at {SHARED_POSTGRES_URL} ({type(error).__name__}); start it (see .ci/run)")
    return SHARED_POSTGRES_URL


class PostgresDatabase:
    """A database of this test's own on a PostgreSQL server, dropped (only it) when the test ends."""

    def __init__(self, server_url: str):
        self.server_url = server_url
        self.name = f"genapi_test_{uuid.uuid4().hex[:16]}"
        with admin_connection(server_url) as connection:
            connection.execute(f'CREATE DATABASE "{self.name}"')
        self.url = server_url.rsplit("/", 1)[0] + f"/{self.name}"

    def drop(self) -> None:
        with admin_connection(self.server_url) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


@pytest.fixture
def postgres_database(shared_postgres_url):
    database = PostgresDatabase(shared_postgres_url)
    yield database
    database.drop()


@pytest.fixture
def migrated_postgres_url(postgres_database) -> str:
    """A fresh PostgreSQL database with genapi's schema, as the release phase leaves it."""
    from genapi.database import database_url, upgrade

    upgrade(database_url(make_settings(database_url=postgres_database.url)))
    return postgres_database.url


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path) -> str:
    """A database of this test's own with genapi's schema: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/genapi.sqlite3"
    return request.getfixturevalue("migrated_postgres_url")


@pytest.fixture
def db_app(database_url, make_app):
    """An app on this test's own database; keyword arguments override settings."""

    def build(**overrides):
        return make_app(**({"database_url": database_url} | overrides))

    return build


class PrivatePostgres:
    """A PostgreSQL cluster of this test's own (initdb in a temporary folder, on a free port), which it may stop.

    initdb refuses to run as root, so as root the cluster belongs to the `postgres` user.
    """

    def __init__(self, tmp_path):
        self.port = free_port()
        self.folder = tempfile.mkdtemp(prefix="genapi-pg-")
        self.data = os.path.join(self.folder, "data")
        self.as_owner = []
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
            self.as_owner = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
        self.start()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *command) -> None:
        subprocess.run(self.as_owner + list(command), check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        options = f"-p {self.port} -h 127.0.0.1 -k {self.folder} -c fsync=off"
        self._run("pg_ctl", "-D", self.data, "-o", options, "-l", os.path.join(self.folder, "log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        subprocess.run(self.as_owner + ["pg_ctl", "-D", self.data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def private_postgres(tmp_path):
    """A PostgreSQL that this test can take away mid-run; the shared one is never stopped."""
    if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
        postgres_missing("initdb and pg_ctl are not installed (apt-get install postgresql)")
    server = PrivatePostgres(tmp_path)
    yield server
    server.remove()
