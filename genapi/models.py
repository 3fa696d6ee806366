"""The database's tables, as SQLAlchemy models: keys, the audit log of admin actions, and the usage ledger.

The schema itself is made and changed by the Alembic migrations in migrations/, never by `create_all`.
"""

from datetime import datetime

from sqlalchemy import JSON, Boolean, DateTime, Float, Index, Integer, LargeBinary, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


# Every time is naive UTC: SQLite keeps no time zone, and one convention for both databases keeps queries alike.


class ApiKey(Base):
    """A client key made through the admin API or the CLI; the secret itself is never stored, only its digest."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)  # public: the `<id>` of `gk_<id>_<secret>`
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(8))  # "user" or "admin"
    secret_digest: Mapped[bytes] = mapped_column(LargeBinary(32))
    # After a rotation with a grace period, the old secret keeps working until previous_valid_until.
    previous_secret_digest: Mapped[bytes | None] = mapped_column(LargeBinary(32))
    previous_valid_until: Mapped[datetime | None] = mapped_column(DateTime)
    rate_limit: Mapped[str | None] = mapped_column(String(100))  # None: RATE_LIMIT (or ADMIN_RATE_LIMIT) applies
    allowed_models: Mapped[list[str] | None] = mapped_column(JSON)  # None: ALLOWED_MODELS applies
    # "50000/day", or "none" for no budget at all; None: TOKEN_BUDGET (or ADMIN_TOKEN_BUDGET) applies.
    token_budget: Mapped[str | None] = mapped_column(String(32))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class AuditEntry(Base):
    """One admin action, append-only: who (the admin key's name), when, what, and the key before and after."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime, index=True)
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(32))  # key.created, key.updated, key.rotated, key.revoked
    key_id: Mapped[str] = mapped_column(String(16), index=True)
    before: Mapped[dict | None] = mapped_column(JSON)  # the key's public fields, never a secret or a digest
    after: Mapped[dict | None] = mapped_column(JSON)


class UsageRow(Base):
    """One request that reached the model or the cache: who, what, how many tokens, how it ended. Never a prompt,
    an output or a secret."""

    __tablename__ = "usage"
    __table_args__ = (Index("ix_usage_key_at", "key_name", "key_id", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime, index=True)
    request_id: Mapped[str] = mapped_column(String(128))
    key_id: Mapped[str | None] = mapped_column(String(16))  # a database key's id; None for an API_KEYS key
    key_name: Mapped[str] = mapped_column(String(64))
    route: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(200))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    estimated: Mapped[bool] = mapped_column(Boolean)  # counted by genapi (a stream cut short), not by the model
    cached: Mapped[bool] = mapped_column(Boolean)
    status: Mapped[int] = mapped_column(Integer)
    error_code: Mapped[str | None] = mapped_column(String(64))
    duration_ms: Mapped[float] = mapped_column(Float)
    upstream_ms: Mapped[float | None] = mapped_column(Float)
