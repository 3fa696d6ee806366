"""The rate limits' storage: Redis while it answers and accepts writes, this process's memory while it does not.

A fallback that starts only when a check fails, and trusts a PING to end it (Flask-Limiter's), misses a Redis that
answers reads but refuses writes (maxmemory under noeviction, a read-only replica): it passes both, while every
count is lost. Here every call that Redis fails, read or write, is served from memory, the
outage is RedisState's (logged once, reported by /readyz), and Redis is used again once a write to it succeeds.
"""

from limits.errors import StorageError
from limits.storage import MemoryStorage, MovingWindowSupport, Storage, storage_from_string

from genapi.redis_state import RedisState, redis


class RedisOrMemoryStorage(Storage, MovingWindowSupport):
    """A limits storage (scheme genapi+redis:// or genapi+rediss://) over the process's shared Redis pool."""

    STORAGE_SCHEME = ["genapi+redis", "genapi+rediss"]

    def __init__(self, uri: str, redis_state: RedisState, key_prefix: str, wrap_exceptions: bool = False, **_):
        super().__init__(uri, wrap_exceptions=wrap_exceptions)
        self._state = redis_state
        scheme = "rediss://" if uri.startswith("genapi+rediss") else "redis://"
        # limits' RedisStorage only reads the scheme from the URI: the connection is our shared pool.
        self._redis = storage_from_string(
            scheme, connection_pool=redis_state.client.connection_pool, key_prefix=key_prefix
        )
        self._memory = MemoryStorage()

    @property
    def base_exceptions(self):
        return redis.RedisError

    def _call(self, method: str, *args, **kwargs):
        if self._state.usable():
            try:
                return getattr(self._redis, method)(*args, **kwargs)
            except (redis.RedisError, StorageError) as error:
                self._state.failed(error)
        return getattr(self._memory, method)(*args, **kwargs)

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        return self._call("incr", key, expiry, amount=amount)

    def get(self, key: str) -> int:
        return self._call("get", key)

    def get_expiry(self, key: str) -> float:
        return self._call("get_expiry", key)

    def clear(self, key: str) -> None:
        return self._call("clear", key)

    def reset(self) -> int | None:
        return self._call("reset")

    def check(self) -> bool:
        return self._state.usable()

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        return self._call("acquire_entry", key, limit, expiry, amount=amount)

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        return self._call("get_moving_window", key, limit, expiry)
