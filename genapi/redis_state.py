"""The one Redis connection of a process, shared by the rate limits and the cache, and whether Redis is usable.

Usable means it answers and accepts writes: a Redis at maxmemory under noeviction, or a read-only replica, answers
PING and reads but refuses every write, and is treated like one that does not answer.
"""

import importlib.util
import logging
import sys
import time
from urllib.parse import urlsplit

log = logging.getLogger("genapi")

# Redis next to the app answers in about a millisecond; one silent for half a second is down as far as a request
# is concerned, and neither a request nor a readiness probe may hang on it.
REDIS_TIMEOUT_SECONDS = 0.5
# Idle pooled connections are pinged before reuse after this long, so a Redis restart costs a reconnect.
REDIS_HEALTH_CHECK_SECONDS = 30
# While Redis is unusable, one request a process in this many seconds tries it again (a write), not every request.
REDIS_RECHECK_SECONDS = 5.0
# The key /readyz and the recheck write to, with a short expiry, to see that Redis takes writes.
PROBE_KEY = "ready-probe"


def imported_on_first_use(name: str):
    """The module, loaded the first time one of its names is read (importlib's LazyLoader)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# redis-py (~4 MB in every process) loads only once a Redis client is built, for REDIS_URL: without one, no code
# path reads a name of it, since its errors are only looked up when an exception is being handled.
redis = imported_on_first_use("redis")


def masked_url(url: str) -> str:
    """The URL for logs: its password replaced (redis://:***@host:6379/0), its query (which may hold one) left out."""
    parts = urlsplit(url)._replace(query="")
    if parts.password is None:
        return parts.geturl()
    host = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()


def connect(url: str) -> "redis.Redis":
    """A client for REDIS_URL; it connects lazily, on the first command."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    options = {}
    if url.startswith("rediss://"):
        # Heroku Redis serves TLS with a self-signed certificate, and Heroku documents turning verification off
        # for it; `?ssl_cert_reqs=required` in the URL still wins, for a Redis with a verifiable certificate.
        options["ssl_cert_reqs"] = None
    return redis.Redis.from_url(
        url,
        socket_timeout=REDIS_TIMEOUT_SECONDS,
        socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
        health_check_interval=REDIS_HEALTH_CHECK_SECONDS,
        # One immediate retry covers a pooled connection that went stale; redis-py's default (3 retries, backing
        # off up to 10 s) would hold every request for seconds while Redis is down.
        retry=Retry(NoBackoff(), retries=1),
        **options,
    )


class RedisState:
    """The client, and whether Redis was usable last time, so an outage is logged once when it starts and when it ends.

    The rate limits (genapi.limit_storage) and the cache (genapi.cache) report every Redis failure here, and ask
    `usable()` before each use: while Redis is not, they keep to this process.
    """

    def __init__(self, url: str, key_prefix: str):
        self.url = masked_url(url)
        self.key_prefix = key_prefix
        self.client = connect(url)
        self.answering = True
        self._recheck_at = 0.0

    def __repr__(self) -> str:
        return f"RedisState({self.url!r})"

    def usable(self) -> bool:
        """Whether to use Redis now: yes while it is usable; while it is not, a write probe every few seconds."""
        if self.answering:
            return True
        now = time.monotonic()
        if now < self._recheck_at:
            return False
        self._recheck_at = now + REDIS_RECHECK_SECONDS  # before the probe: the requests meanwhile do not probe too
        return self.problem() is None

    def failed(self, error: Exception) -> None:
        self._recheck_at = time.monotonic() + REDIS_RECHECK_SECONDS
        if self.answering:
            log.error(
                "Redis at %s is not answering or refuses writes (%s: %s): rate limits fall back to per-process "
                "counts and the cache is skipped until it is back",
                self.url,
                type(error).__name__,
                str(error)[:200],
            )
        self.answering = False

    def answered(self) -> None:
        if not self.answering:
            log.warning("Redis at %s answers again", self.url)
        self.answering = True

    def problem(self) -> str | None:
        """None when Redis takes a write now, otherwise what is wrong."""
        try:
            self.client.set(self.key_prefix + PROBE_KEY, b"1", px=10_000)
        except redis.ResponseError as error:  # it answered, and said no: out of memory, read-only, ...
            self.failed(error)
            return f"Redis refuses writes ({type(error).__name__})"
        except redis.RedisError as error:
            self.failed(error)
            return f"Redis does not answer ({type(error).__name__})"
        self.answered()
        return None
