"""Client keys: the API_KEYS entries, and the keys kept in the database, checked against a presented key.

Both kinds are held only as SHA-256 digests and compared in constant time. A key is random (32 bytes from
`secrets`), so one SHA-256 is enough: there is nothing for a slow password hash to protect against.
A database key reads `gk_<id>_<secret>`: its public id makes its lookup one read by primary key, and the lookup is
cached for KEY_CACHE_SECONDS, so that the request path stays off the database and a revocation still reaches
every worker within that time.
"""

import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from cachetools import LRUCache
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from genapi.budget_periods import Budget, NoBudget, parse_key_budget
from genapi.models import api_keys

HASH_PREFIX = "sha256:"
DATABASE_KEY_PREFIX = "gk_"
DATABASE_KEY = re.compile(r"gk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")

log = logging.getLogger("genapi")


@dataclass(frozen=True)
class Client:
    """Who is calling: a name that is safe to log and to count by, never the key itself."""

    name: str
    is_admin: bool = False
    key_id: str | None = None  # a database key's public id; None for a key from API_KEYS or ADMIN_API_KEYS
    rate_limit: str | None = None  # the key's own limit, over RATE_LIMIT (and ADMIN_RATE_LIMIT)
    allowed_models: tuple[str, ...] | None = None  # the key's own list, over ALLOWED_MODELS
    # The key's own token budget, or NO_BUDGET for none at all; None: TOKEN_BUDGET (ADMIN_TOKEN_BUDGET for admins).
    budget: Budget | NoBudget | None = None

    def bound_models(self, allowed_models) -> tuple[str, ...]:
        """The models this key may ask for, empty for any: its own list (a database key's allowed_models) replaces
        ALLOWED_MODELS, for admins too; without one, ALLOWED_MODELS binds users, not admins."""
        if self.allowed_models is not None:
            return self.allowed_models
        return () if self.is_admin else tuple(allowed_models)


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    client: Client


class KeyRefused(Exception):
    """A database key whose secret is right but which may not be used: revoked or expired (its code says which)."""

    def __init__(self, code: str):
        super().__init__(code)
        self.code = code


class KeyStoreUnavailable(Exception):
    """A database key that is not in the cache could not be read: the database is away."""


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def parse_entry(entry: str, is_admin: bool = False) -> _Entry:
    """`key`, `sha256:<hex>`, `name:key` or `name:sha256:<hex>` -> an entry holding only the key's digest."""
    name = None
    if not entry.startswith(HASH_PREFIX) and ":" in entry:
        name, entry = entry.split(":", 1)
        if not name:
            raise ValueError("an entry has an empty name before ':'")
    if entry.startswith(HASH_PREFIX):
        hex_digest = entry[len(HASH_PREFIX) :].lower()
        if len(hex_digest) != 64 or any(c not in "0123456789abcdef" for c in hex_digest):
            raise ValueError("a sha256: entry must be followed by 64 hex digits")
        key_digest = bytes.fromhex(hex_digest)
    elif entry:
        if not entry.isascii() or not entry.isprintable() or " " in entry:
            # HTTP headers are Latin-1 on the wire, and curl sends a UTF-8 key as its bytes: no client could send it.
            raise ValueError("a key may hold only printable ASCII characters without spaces; no client could send it")
        key_digest = digest(entry)
    else:
        raise ValueError("an entry has an empty key")
    # Unnamed keys are known by a short hash, which is safe to log and cannot be turned back into the key.
    return _Entry(key_digest, Client(name or f"key-{key_digest.hex()[:8]}", is_admin))


def new_database_key() -> tuple[str, str, bytes]:
    """A new key's public id, the whole key to hand out once, and the digest of its secret, which is all we keep."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return key_id, f"{DATABASE_KEY_PREFIX}{key_id}_{secret}", digest(secret)


def new_secret(key_id: str) -> tuple[str, bytes]:
    """A fresh secret for an existing id (a rotation): the whole key, and its secret's digest."""
    secret = secrets.token_urlsafe(32)
    return f"{DATABASE_KEY_PREFIX}{key_id}_{secret}", digest(secret)


@dataclass(frozen=True)
class StoredKey:
    """What a lookup needs of a database key, copied out of its row."""

    id: str
    name: str
    role: str
    secret_digest: bytes
    previous_secret_digest: bytes | None
    previous_valid_until: datetime | None
    rate_limit: str | None
    allowed_models: tuple[str, ...] | None
    expires_at: datetime | None
    revoked_at: datetime | None
    token_budget: Budget | NoBudget | None = None

    def __repr__(self) -> str:  # never the digests
        return f"StoredKey({self.id}, {self.name!r})"

    def client_for(self, secret_digest: bytes, now: datetime) -> Client | None:
        """The client, if the secret is this key's (or its previous one, within the grace period); else None."""
        current = hmac.compare_digest(self.secret_digest, secret_digest)
        previous = self.previous_secret_digest is not None and hmac.compare_digest(
            self.previous_secret_digest, secret_digest
        )
        if not current and not (previous and self.previous_valid_until and now < self.previous_valid_until):
            return None
        # Only a caller who holds the secret learns that the key is revoked or expired.
        if self.revoked_at is not None:
            raise KeyRefused("key_revoked")
        if self.expires_at is not None and now >= self.expires_at:
            raise KeyRefused("key_expired")
        return Client(self.name, self.role == "admin", self.id, self.rate_limit, self.allowed_models, self.token_budget)


class DatabaseKeys:
    """Database keys by id, each read at most once per KEY_CACHE_SECONDS by this process.

    While the database is away, a key read before keeps its last known state; one never read is refused with 503.
    """

    MISSING = object()

    def __init__(self, engine, ttl: float, clock=time.monotonic):
        self._engine = engine
        self._ttl = ttl
        self._clock = clock
        self._cache: LRUCache = LRUCache(maxsize=100_000)  # id -> (read at, StoredKey or MISSING)
        # One read at a time per key: a thousand requests of one gevent worker arriving with the same key, after its
        # entry went stale, make one read, not a thousand that would empty the connection pool.
        self._read_locks: dict[str, list] = {}  # id -> [lock, how many requests hold or wait for it]
        self._guard = threading.Lock()
        self._database_away = False

    def __repr__(self) -> str:
        return f"DatabaseKeys({len(self._cache)} cached)"

    def get(self, key_id: str) -> StoredKey | None:
        cached = self._cache.get(key_id)
        if cached is not None and self._clock() - cached[0] < self._ttl:
            return None if cached[1] is self.MISSING else cached[1]
        with self._reading(key_id):
            cached = self._cache.get(key_id)
            if cached is not None and self._clock() - cached[0] < self._ttl:  # read while this one waited
                return None if cached[1] is self.MISSING else cached[1]
            try:
                stored = self.read(key_id)
            except SQLAlchemyError as error:
                if not self._database_away:
                    log.warning("keys: the database is unreachable (%s); known keys keep their last state", type(error).__name__)
                    self._database_away = True
                if cached is None:
                    raise KeyStoreUnavailable() from None
                return None if cached[1] is self.MISSING else cached[1]
            if self._database_away:
                log.warning("keys: the database is reachable again")
                self._database_away = False
            self._cache[key_id] = (self._clock(), self.MISSING if stored is None else stored)
            return stored

    @contextlib.contextmanager
    def _reading(self, key_id: str):
        with self._guard:
            entry = self._read_locks.setdefault(key_id, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._guard:
                entry[1] -= 1
                if not entry[1]:
                    del self._read_locks[key_id]

    def forget(self, key_id: str) -> None:
        """Drop a key's cached state, after this process changed it: here the change counts at once."""
        self._cache.pop(key_id, None)

    def read(self, key_id: str) -> StoredKey | None:
        with self._engine.connect() as connection:
            row = connection.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        if row is None:
            return None
        return StoredKey(
            row.id, row.name, row.role, row.secret_digest, row.previous_secret_digest, row.previous_valid_until,
            row.rate_limit, tuple(row.allowed_models) if row.allowed_models is not None else None,
            row.expires_at, row.revoked_at, key_budget(row),
        )


def key_budget(row) -> Budget | NoBudget | None:
    """A row's own token budget; one the admin API could not have written (edited by hand) counts as unset."""
    if row.token_budget is None:
        return None
    try:
        return parse_key_budget(row.token_budget)
    except ValueError:
        log.warning("keys: key %s has a token_budget that is not one; TOKEN_BUDGET applies to it", row.id)
        return None


def utc_now() -> datetime:
    """Now, as the naive UTC time the database keeps."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class KeyRing:
    """The accepted keys: API_KEYS and ADMIN_API_KEYS as digests, and the database's keys when there is one."""

    def __init__(self, user_entries: list[str], admin_entries: list[str] = (), database_keys: DatabaseKeys | None = None):
        self._entries = [parse_entry(e) for e in user_entries] + [parse_entry(e, is_admin=True) for e in admin_entries]
        self.database_keys = database_keys

    def __repr__(self) -> str:
        return f"KeyRing({len(self._entries)} keys from the environment)"

    @property
    def environment_clients(self) -> list[Client]:
        """The clients of API_KEYS and ADMIN_API_KEYS, in their order, for the admin API to list."""
        return [entry.client for entry in self._entries]

    def identify(self, presented: str) -> Client | None:
        """The client whose key this is, or None; raises KeyRefused for a revoked or expired database key."""
        if self.database_keys is not None and presented.startswith(DATABASE_KEY_PREFIX):
            match = DATABASE_KEY.fullmatch(presented)
            if match:
                stored = self.database_keys.get(match[1])
                return stored.client_for(digest(match[2]), utc_now()) if stored else None
        presented_digest = digest(presented)
        found = None
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, presented_digest):
                found = found or entry.client
        return found
