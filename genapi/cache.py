"""The response cache: /generate answers kept for CACHE_TTL seconds, per client key, in Redis or in this process.

Both caches hold the parts of a success body that do not change between requests (not the id, not "cached"),
and both have the same two methods; a Redis failure is a miss, never an error. Both are bounded: an answer whose
JSON is over CACHE_MAX_ENTRY_BYTES is not cached, and at CACHE_MAX_ENTRIES (and, in memory, CACHE_MAX_BYTES) a new
entry pushes out the oldest one, so the cache can never fill Redis and starve the rate limits of room.
"""

import hashlib
import json
import threading
import time

import cachetools

from config import Settings
from genapi.providers import Generation
from genapi.redis_state import RedisState, redis


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


def stored_form(answer: dict, max_entry_bytes: int) -> bytes | None:
    """The answer as the cache keeps it (its JSON), or None when it is too large to be cached."""
    encoded = json.dumps(answer, ensure_ascii=False).encode()
    return encoded if len(encoded) <= max_entry_bytes else None


class MemoryCache:
    """An LRU whose entries expire, for one process, bounded in entries and in bytes."""

    def __init__(self, ttl: int, max_entries: int, max_bytes: int, max_entry_bytes: int, clock=time.monotonic):
        # cachetools bounds the sum of getsizeof: each entry weighs its bytes, but at least max_bytes/max_entries,
        # so that one bound holds both the bytes and the count.
        least = max(1, max_bytes // max_entries)
        self._entries = cachetools.TTLCache(
            maxsize=max_bytes, ttl=ttl, timer=clock, getsizeof=lambda entry: max(least, entry[1])
        )
        self._max_entry_bytes = min(max_entry_bytes, max_bytes)
        # cachetools is not thread-safe, and a batch's prompts use the cache from several threads.
        self._lock = threading.Lock()

    def get(self, key: str) -> dict | None:
        with self._lock:
            entry = self._entries.get(key)
        return entry[0] if entry else None

    def put(self, key: str, answer: dict) -> None:
        encoded = stored_form(answer, self._max_entry_bytes)
        with self._lock:
            if encoded is None:
                self._entries.pop(key, None)  # a fresh answer too large to keep must not leave an older one behind
                return
            # Python's objects take more than their JSON; the JSON's length, plus a fixed overhead, is the measure.
            self._entries[key] = (answer, len(encoded) + ENTRY_OVERHEAD_BYTES)


# What a cached dict, its key and cachetools' bookkeeping take besides the text itself, measured roughly.
ENTRY_OVERHEAD_BYTES = 1024

# Stores one entry and indexes it by its expiry in a sorted set; first drops what has expired from the index, then,
# at max_entries, the entries that expire soonest (all have the same TTL, so the oldest). Atomic, as a script is.
STORE_BOUNDED = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl_ms = tonumber(ARGV[2]) * 1000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
redis.call('ZREM', KEYS[1], KEYS[2])
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[3]) + 1
if excess > 0 then
  local oldest = redis.call('ZPOPMIN', KEYS[1], excess)
  for i = 1, #oldest, 2 do redis.call('DEL', oldest[i]) end
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ttl_ms)
redis.call('ZADD', KEYS[1], now_ms + ttl_ms, KEYS[2])
redis.call('PEXPIRE', KEYS[1], ttl_ms)
"""


class RedisCache:
    """Shared by every worker and instance: JSON under `<REDIS_KEY_PREFIX>cache:<key>`, expiring after the TTL.

    The entries are listed in the sorted set `<REDIS_KEY_PREFIX>cache-index`, which keeps them to max_entries.
    """

    def __init__(self, redis_state: RedisState, ttl: int, max_entries: int, max_entry_bytes: int):
        self._redis = redis_state
        self._ttl = ttl
        self._max_entries = max_entries
        self._max_entry_bytes = max_entry_bytes
        self._prefix = f"{redis_state.key_prefix}cache:"
        self._index = f"{redis_state.key_prefix}cache-index"
        self._store = redis_state.client.register_script(STORE_BOUNDED)

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
        encoded = stored_form(answer, self._max_entry_bytes)
        try:
            if encoded is None:  # too large to keep: an older entry for the same request must not stay behind
                self._redis.client.delete(self._prefix + key)
            else:
                self._store(keys=[self._index, self._prefix + key], args=[encoded, self._ttl, self._max_entries])
        except redis.RedisError as error:
            self._redis.failed(error)


def build_cache(settings: Settings, redis_state: RedisState | None) -> MemoryCache | RedisCache | None:
    """The cache the settings ask for; None when CACHE_TTL is 0."""
    if not settings.cache_ttl:
        return None
    if redis_state:
        return RedisCache(redis_state, settings.cache_ttl, settings.cache_max_entries, settings.cache_max_entry_bytes)
    return MemoryCache(
        settings.cache_ttl, settings.cache_max_entries, settings.cache_max_bytes, settings.cache_max_entry_bytes
    )
