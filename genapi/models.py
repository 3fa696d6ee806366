"""The database's tables: keys, the audit log of admin actions, and the usage ledger.

They are SQLAlchemy Core tables, read and written with plain statements: nothing here needs an object per row,
and SQLAlchemy's ORM would be ~6 MB more in every process. The schema itself is made and changed by the Alembic
migrations in migrations/, never by `create_all`.
"""

from sqlalchemy import JSON, Boolean, Column, DateTime, Float, Index, Integer, LargeBinary, MetaData, String, Table

metadata = MetaData()

# Every time is naive UTC: SQLite keeps no time zone, and one convention for both databases keeps queries alike.

# A client key made through the admin API or the CLI; the secret itself is never stored, only its digest.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(16), primary_key=True),  # public: the `<id>` of `gk_<id>_<secret>`
    Column("name", String(64), nullable=False),
    Column("role", String(8), nullable=False),  # "user" or "admin"
    Column("secret_digest", LargeBinary(32), nullable=False),
    # After a rotation with a grace period, the old secret keeps working until previous_valid_until.
    Column("previous_secret_digest", LargeBinary(32)),
    Column("previous_valid_until", DateTime),
    Column("rate_limit", String(100)),  # None: RATE_LIMIT (or ADMIN_RATE_LIMIT) applies
    Column("allowed_models", JSON),  # None: ALLOWED_MODELS applies
    # "50000/day", or "none" for no budget at all; None: TOKEN_BUDGET (or ADMIN_TOKEN_BUDGET) applies.
    Column("token_budget", String(32)),
    Column("expires_at", DateTime),
    Column("revoked_at", DateTime),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
)

# One admin action, append-only: who (the admin key's name), when, what, and the key before and after.
audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime, nullable=False, index=True),
    Column("actor", String(100), nullable=False),
    Column("action", String(32), nullable=False),  # key.created, key.updated, key.rotated, key.revoked
    Column("key_id", String(16), nullable=False, index=True),
    Column("before", JSON),  # the key's public fields, never a secret or a digest
    Column("after", JSON),
)

# One request that reached the model or the cache: who, what, how many tokens, how it ended. Never a prompt, an
# output or a secret.
usage_ledger = Table(
    "usage",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime, nullable=False, index=True),
    Column("request_id", String(128), nullable=False),
    Column("key_id", String(16)),  # a database key's id; None for an API_KEYS key
    Column("key_name", String(64), nullable=False),
    Column("route", String(100), nullable=False),
    Column("model", String(200), nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("estimated", Boolean, nullable=False),  # counted by genapi (a stream cut short), not by the model
    Column("cached", Boolean, nullable=False),
    Column("status", Integer, nullable=False),
    Column("error_code", String(64)),
    Column("duration_ms", Float, nullable=False),
    Column("upstream_ms", Float),
    Index("ix_usage_key_at", "key_name", "key_id", "at"),
)
