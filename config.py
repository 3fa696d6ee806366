"""genapi's settings: the one place configuration comes from.

Everything is read from the environment and from a `.env` file (the environment wins; an empty variable counts as
unset), validated once at start-up, so that a wrong value stops the process with a message naming the variable.
"""

from genapi.require_python import require_python

require_python()  # before the imports below, which would fail less clearly on an older Python

import logging  # noqa: E402
import os  # noqa: E402
import secrets  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402
from typing import Annotated, Literal  # noqa: E402

from limits import parse_many  # noqa: E402
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator  # noqa: E402
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict  # noqa: E402

from genapi.budget_periods import Budget  # noqa: E402
from genapi.keys import parse_entry  # noqa: E402

log = logging.getLogger("genapi")

# Heroku's router gives up on a request after 30 s; we keep a margin for our own work and the network.
HEROKU_ROUTER_LIMIT_SECONDS = 30
UPSTREAM_BUDGET_SECONDS = 25

# The OpenAI SDK sleeps 0.5 s before its first retry, doubling each time up to 8 s (openai/_constants.py).
SDK_INITIAL_RETRY_DELAY = 0.5
SDK_MAX_RETRY_DELAY = 8.0


def worst_case_upstream_seconds(timeout: float, max_retries: int) -> float:
    """How long one request can spend upstream: every attempt timing out, plus the back-off between them."""
    backoff = sum(min(SDK_INITIAL_RETRY_DELAY * 2**n, SDK_MAX_RETRY_DELAY) for n in range(max_retries))
    return timeout * (max_retries + 1) + backoff


def split_list(value: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']"""
    return [item.strip() for item in value.split(",") if item.strip()]


def checked_url(value, schemes: tuple[str, ...], example: str, named: str | None = None) -> str | None:
    """A URL setting that may hold a password: None when empty; else it must have one of `schemes` and a port that
    is a number (which its client library would only find later)."""
    url = value.get_secret_value() if isinstance(value, SecretStr) else value
    if url in (None, ""):
        return None
    if not url.startswith(schemes):
        named = named or ", ".join(schemes[:-1]) + " or " + schemes[-1]
        raise ValueError(f"must start with {named}, for example {example}")
    try:
        urlsplit(url).port
    except ValueError:
        raise ValueError("has a port that is not a number") from None
    return url


class Settings(BaseSettings):
    """Every setting genapi reads, typed; see .env.example for one line on each."""

    # An empty variable (`LLM_PROVIDER=`, as .env.example has them) means "not set": the default applies.
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", env_ignore_empty=True)

    # Client keys: comma-separated entries, each `key`, `sha256:<hex>`, `name:key` or `name:sha256:<hex>`.
    api_keys: SecretStr = SecretStr("")
    # Admins: the same format; they may use any model and reach operational endpoints such as /metrics.
    admin_api_keys: SecretStr = SecretStr("")

    # The model server.
    llm_provider: Literal["openai", "mock"] | None = None
    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    openai_model: str = "gpt-4o-mini"
    openai_timeout: float = Field(default=12.0, gt=0)
    openai_max_retries: int = Field(default=1, ge=0, le=5)
    # The most bytes read of one upstream answer, as sent and once decompressed; past it the answer is a 502.
    max_upstream_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024)

    # Limits on what a client may ask for.
    max_prompt_chars: int = Field(default=32000, ge=1)
    max_tokens_limit: int = Field(default=4096, ge=1)
    max_content_length: int = Field(default=1024 * 1024, ge=1024)
    allowed_models: Annotated[list[str], NoDecode] = []

    # Rate limits, in the notation of the limits library ("60/minute", "10/second;500/hour": both hold).
    rate_limit: str = "60/minute"
    admin_rate_limit: str = ""  # empty: admins have RATE_LIMIT too; "none": admins are not limited
    auth_failure_limit: str = "10/minute"  # failed authentications per client address
    invalid_request_limit: str = "60/minute"  # requests refused for their body (400, 413, 415, 422) per address
    trusted_proxies: int = Field(default=0, ge=0, le=10)  # hops whose X-Forwarded-For is believed; Heroku: 1

    # Token budgets: tokens per key per calendar period in UTC ("200000/day"; minute, hour, day, month); empty: none.
    token_budget: str = ""
    admin_token_budget: str = ""  # empty: admins have TOKEN_BUDGET too; "none": admins have no budget
    token_budget_mode: Literal["enforce", "shadow"] = "enforce"  # shadow: log and count refusals, refuse nothing
    # With REDIS_URL and Redis failing: refuse calls to the model (closed), or count in each process (open).
    token_budget_on_redis_error: Literal["closed", "open"] = "closed"

    # Browser pages on these origins may call the API (CORS); empty: none, `*`: any.
    cors_origins: Annotated[list[str], NoDecode] = []

    # Shared state: with REDIS_URL, every worker and instance shares rate counts and the cache.
    redis_url: SecretStr | None = None  # may hold a password
    redis_key_prefix: str = Field(default="genapi:", min_length=1, max_length=100)

    # The database of keys, the audit log and the usage ledger: a SQLite file in the instance folder by default;
    # postgres:// (as Heroku Postgres sets it) or postgresql:// for PostgreSQL. May hold a password.
    database_url: SecretStr | None = None
    # Seconds a key read from the database is trusted before it is read again: how long a revocation takes to reach
    # every worker of every instance.
    key_cache_seconds: float = Field(default=1.0, gt=0, le=2)
    # The usage ledger: rows are written in batches this often, off the request path; at most this many wait for
    # the database while it is away (past that, the oldest are dropped, logged and counted).
    usage_flush_seconds: float = Field(default=1.0, gt=0, le=10)
    usage_buffer_rows: int = Field(default=100_000, ge=100)

    # The response cache: seconds an answer is kept; 0 turns it off.
    cache_ttl: int = Field(default=0, ge=0)
    cache_max_entries: int = Field(default=1024, ge=1)  # in each process without Redis, in all with it
    cache_max_entry_bytes: int = Field(default=64 * 1024, ge=1024)  # a larger answer is not cached
    cache_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)  # the in-process cache, in each process

    # Streams ("stream": true, and /v1/chat/completions): they replace OPENAI_TIMEOUT for a streamed call.
    # A comment goes out after this many seconds of silence, inside Heroku's 30 s first-byte and 55 s idle windows.
    stream_heartbeat_seconds: float = Field(default=15.0, gt=0, le=25)
    stream_first_token_timeout: float = Field(default=60.0, gt=0)  # from the call to the model's first chunk
    stream_idle_timeout: float = Field(default=30.0, gt=0)  # the longest silence between two chunks
    stream_max_seconds: float = Field(default=600.0, gt=0)  # the whole stream, first byte to last
    mock_stream_delay: float = Field(default=0.05, ge=0, le=5)  # the mock provider's pause between streamed words

    # POST /generate/batch.
    batch_max_prompts: int = Field(default=16, ge=1, le=256)
    batch_concurrency: int = Field(default=8, ge=1, le=64)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Prompts and outputs are the clients' data: they reach the request log line only when asked for.
    log_prompts: bool = False

    # The server (gunicorn.conf.py): Heroku sets PORT, and WEB_CONCURRENCY on most dynos.
    port: int = Field(default=8000, ge=1, le=65535)
    web_concurrency: int = Field(default=2, ge=1)
    worker_class: Literal["gevent", "gthread", "sync"] = "gevent"
    worker_connections: int = Field(default=1000, ge=1)
    threads: int = Field(default=32, ge=1)
    access_log: bool = False

    @property
    def in_flight_per_worker(self) -> int:
        """How many requests one worker serves at once, so how many upstream connections it may hold open."""
        return {"gevent": self.worker_connections, "gthread": self.threads, "sync": 1}[self.worker_class]

    @field_validator("api_keys", "admin_api_keys")
    @classmethod
    def _check_key_entries(cls, value: SecretStr) -> SecretStr:
        for entry in split_list(value.get_secret_value()):
            parse_entry(entry)  # raises ValueError naming what is wrong, never the key
        return value

    @field_validator("rate_limit", "auth_failure_limit", "invalid_request_limit")
    @classmethod
    def _check_limit(cls, value: str) -> str:
        try:
            parse_many(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a rate limit; write it like 60/minute or 10/second;500/hour") from None
        return value

    @field_validator("admin_rate_limit")
    @classmethod
    def _check_admin_limit(cls, value: str) -> str:
        value = value.strip()
        if value.lower() == "none":
            return "none"
        return cls._check_limit(value) if value else ""

    @field_validator("token_budget", "admin_token_budget")
    @classmethod
    def _check_token_budget(cls, value: str, info) -> str:
        value = value.strip()
        if info.field_name == "admin_token_budget" and value.lower() == "none":
            return "none"
        if value:
            Budget.parse(value)  # raises ValueError saying how to write one
        return value

    @field_validator("redis_url", mode="before")
    @classmethod
    def _check_redis_url(cls, value):
        return checked_url(value, ("redis://", "rediss://", "unix://"), "redis://localhost:6379")

    @field_validator("database_url", mode="before")
    @classmethod
    def _check_database_url(cls, value):
        schemes = ("sqlite://", "postgres://", "postgresql://", "postgresql+psycopg://")
        return checked_url(value, schemes, "sqlite:///genapi.db", named="postgres://, postgresql:// or sqlite://")

    @field_validator("allowed_models", "cors_origins", mode="before")
    @classmethod
    def _split_models(cls, value):
        return split_list(value) if isinstance(value, str) else value

    @field_validator("openai_base_url")
    @classmethod
    def _check_base_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://, for example http://localhost:11434/v1")
        # The URL shows in logs and reprs; a password in it would show with it.
        if urlsplit(value).username is not None:
            raise ValueError("must not hold a user or password; genapi sends OPENAI_API_KEY as the bearer token")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _derive_and_check(self) -> "Settings":
        if self.llm_provider is None:
            self.llm_provider = "openai" if self.openai_api_key else "mock"
        if self.llm_provider == "openai" and not self.openai_api_key and not self.openai_base_url:
            raise ValueError(
                "LLM_PROVIDER=openai needs OPENAI_API_KEY (or OPENAI_BASE_URL for a local server that needs no key)"
            )
        worst = worst_case_upstream_seconds(self.openai_timeout, self.openai_max_retries)
        if worst > UPSTREAM_BUDGET_SECONDS:
            raise ValueError(
                f"OPENAI_TIMEOUT={self.openai_timeout:g} with OPENAI_MAX_RETRIES={self.openai_max_retries} can keep a "
                f"request upstream for {worst:g} s, past the {UPSTREAM_BUDGET_SECONDS} s that fits Heroku's "
                f"{HEROKU_ROUTER_LIMIT_SECONDS} s router limit; lower one of them"
            )
        if self.stream_max_seconds < max(self.stream_first_token_timeout, self.stream_idle_timeout):
            raise ValueError(
                "STREAM_MAX_SECONDS must be at least STREAM_FIRST_TOKEN_TIMEOUT and STREAM_IDLE_TIMEOUT, "
                "which bound parts of the same stream"
            )
        return self

    @property
    def has_client_keys(self) -> bool:
        return bool(split_list(self.api_keys.get_secret_value()) or split_list(self.admin_api_keys.get_secret_value()))


def settings_error_message(error: ValidationError) -> str:
    """A start-up message that names each wrong variable, never its value."""
    lines = []
    for item in error.errors():
        variable = "_".join(str(part) for part in item["loc"]).upper()
        lines.append(f"  {variable}: {item['msg']}" if variable else f"  {item['msg']}")
    return "genapi cannot start, the configuration is wrong:\n" + "\n".join(lines)


def load_settings(serving: bool = True, **overrides) -> Settings:
    """Read and check the settings; on a wrong value, print what is wrong and exit.

    A server (`serving`) never runs open: with no client key it refuses to start, or, on the mock provider, makes
    development keys once and keeps them in .env. A command-line tool such as `flask create-key` serves nothing,
    so it needs no key to run.
    """
    try:
        settings = Settings(**overrides)
    except ValidationError as error:
        print(settings_error_message(error), file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if not serving or split_list(settings.api_keys.get_secret_value()):
        return settings
    if settings.llm_provider == "mock":
        return with_development_keys(settings, overrides)
    if not settings.has_client_keys:
        print(
            "genapi cannot start, the configuration is wrong:\n  API_KEYS: empty, and genapi never runs open; "
            "set it to one or more client keys (`.venv/bin/flask --app app create-key NAME` makes one)",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(2)
    print("genapi: API_KEYS is empty, so only admin keys (ADMIN_API_KEYS) are accepted.", file=sys.stderr, flush=True)
    return settings


# Where development keys are kept: the .env file that Settings reads, in the directory the server starts in.
DEVELOPMENT_KEYS_FILE = Path(".env")
# Written beside the development keys: the fuzzer sends keyless and invalid requests on purpose, which the
# per-address limits would otherwise lock out, and newman reads the token budget's headers. Only the offline mock
# is behind these keys, so the looser limits guard nothing.
DEVELOPMENT_SETTINGS = {
    "AUTH_FAILURE_LIMIT": "10000/minute",
    "INVALID_REQUEST_LIMIT": "10000/minute",
    "TOKEN_BUDGET": "1000000/day",
    "ADMIN_TOKEN_BUDGET": "none",
}


def with_development_keys(settings: Settings, overrides: dict) -> Settings:
    """A mock-provider server with no API_KEYS: make a client key (and, with no ADMIN_API_KEYS either, an admin key).

    They are appended to .env, once, so that a restart reads them back and a key the developer copied keeps
    working; the mock answers offline, so nothing but its fake answers and /metrics is behind them. The
    development admin key is not rate limited (unless ADMIN_RATE_LIMIT says otherwise), so that the contract
    tools can run against a local server. They also go into the environment, so that gunicorn's workers, forked
    after gunicorn.conf.py loaded the settings, find the same keys.
    """
    made = {"API_KEYS": f"dev:{secrets.token_urlsafe(24)}"}
    if not split_list(settings.admin_api_keys.get_secret_value()):
        made["ADMIN_API_KEYS"] = f"dev-admin:{secrets.token_urlsafe(24)}"
        if not settings.admin_rate_limit:
            made["ADMIN_RATE_LIMIT"] = "none"
    # What the README's contract tools need of a local server, where the settings are still their defaults.
    made |= {
        variable: value
        for variable, value in DEVELOPMENT_SETTINGS.items()
        if getattr(settings, variable.lower()) == Settings.model_fields[variable.lower()].default
    }
    with DEVELOPMENT_KEYS_FILE.open("a", encoding="utf-8") as dotenv:
        dotenv.write(
            "\n# Development keys of the mock provider, made by genapi on its first start with no API_KEYS; kept here\n"
            "# so that they survive a restart. Replace them with your own keys (and set OPENAI_API_KEY) for real use.\n"
        )
        dotenv.writelines(f"{variable}={value}\n" for variable, value in made.items())
    os.environ.update(made)
    lines = ["genapi: API_KEYS was not set, so this mock-provider server made development keys and wrote them to .env,"]
    lines.append("genapi: where every restart finds them. Send one as the X-API-KEY header:")
    lines.append(f"genapi:   client key: {made['API_KEYS'].removeprefix('dev:')}")
    if "ADMIN_API_KEYS" in made:
        lines.append(f"genapi:   admin key:  {made['ADMIN_API_KEYS'].removeprefix('dev-admin:')}")
    print("\n".join(lines), file=sys.stderr, flush=True)
    return Settings(**overrides)
