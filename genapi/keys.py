"""Client keys: parsing the API_KEYS entries and checking a presented key against them in constant time."""

import hashlib
import hmac
from dataclasses import dataclass

from genapi.budget_periods import Budget

HASH_PREFIX = "sha256:"


@dataclass(frozen=True)
class Client:
    """Who is calling: a name that is safe to log and to count by, never the key itself."""

    name: str
    is_admin: bool = False
    budget: Budget | None = None  # the key's own token budget; None: TOKEN_BUDGET (ADMIN_TOKEN_BUDGET for admins)


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    client: Client


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
        key_digest = digest(entry)
    else:
        raise ValueError("an entry has an empty key")
    # Unnamed keys are known by a short hash, which is safe to log and cannot be turned back into the key.
    return _Entry(key_digest, Client(name or f"key-{key_digest.hex()[:8]}", is_admin))


class KeyRing:
    """The accepted keys, held as SHA-256 digests so that the plaintext is never kept in memory."""

    def __init__(self, user_entries: list[str], admin_entries: list[str] = ()):
        self._entries = [parse_entry(e) for e in user_entries] + [parse_entry(e, is_admin=True) for e in admin_entries]

    def __repr__(self) -> str:
        return f"KeyRing({len(self._entries)} keys)"

    def identify(self, presented: str) -> Client | None:
        """The client whose key this is, or None; every entry is compared, each in constant time."""
        presented_digest = digest(presented)
        found = None
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, presented_digest):
                found = found or entry.client
        return found
