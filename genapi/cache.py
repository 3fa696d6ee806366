"""The response cache: /generate answers kept for CACHE_TTL seconds, per client key, in Redis or in this process.

Both caches hold the parts of a success body that do not change between requests (not the id, not "cached"),
and both have the same two methods; a Redis failure is a miss, never an error.
"""

import hashlib
import json
import threading
import time

import cachetools
import redis

from config import Settings
from genapi.providers import Generation
from genapi.redis_state import RedisState


def cache_key(client_name: str, generation: Generation) -> str:
    """Identical requests from the same client share a key; another client, or any other field, never does."""
    fields = [
        client_name,
        generation.model,
        generation.prompt,
        generation.system,
        generation.max_tokens,
        generation.temperature,
    ]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


class MemoryCache:
    """A bounded LRU whose entries expire, for one process."""

    def __init__(self, ttl: int, max_entries: int, clock=time.monotonic):
        self._entries = cachetools.TTLCache(maxsize=max_entries, ttl=ttl, timer=clock)
        # cachetools is not thread-safe, and a batch's prompts use the cache from several threads.
        self._lock = threading.Lock()

    def get(self, key: str) -> dict | None:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: str, answer: dict) -> None:
        with self._lock:
            self._entries[key] = answer


class RedisCache:
    """Shared by every worker and instance: JSON under `<REDIS_KEY_PREFIX>cache:<key>`, expiring with SETEX."""

    def __init__(self, redis_state: RedisState, ttl: int):
        self._redis = redis_state
        self._ttl = ttl
        self._prefix = f"{redis_state.key_prefix}cache:"

    def get(self, key: str) -> dict | None:
        if not self._redis.usable():
            return None
        try:
            stored = self._redis.client.get(self._prefix + key)
        except redis.RedisError as error:
            self._redis.failed(error)
            return None
        self._redis.answered()
        try:
            return json.loads(stored) if stored else None
        except ValueError:  # not written by genapi (or by another version of it): a miss, overwritten on store
            return None

    def put(self, key: str, answer: dict) -> None:
        if not self._redis.usable():
            return
        try:
            self._redis.client.setex(self._prefix + key, self._ttl, json.dumps(answer))
        except redis.RedisError as error:
            self._redis.failed(error)


def build_cache(settings: Settings, redis_state: RedisState | None) -> MemoryCache | RedisCache | None:
    """The cache the settings ask for; None when CACHE_TTL is 0."""
    if not settings.cache_ttl:
        return None
    if redis_state:
        return RedisCache(redis_state, settings.cache_ttl)
    return MemoryCache(settings.cache_ttl, settings.cache_max_entries)
