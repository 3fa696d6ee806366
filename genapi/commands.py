"""The `flask --app app ...` commands: `create-key` (an API_KEYS entry), `db upgrade`, and `keys ...` (database keys).

Each prints its result, and only its result, on stdout (logs go to stderr), so that scripts can read it.
"""

import json
import re
import secrets

import click
from flask import current_app
from flask.cli import AppGroup
from pydantic import ValidationError

from genapi.keys import HASH_PREFIX, digest

# A name goes into logs and rate-limit buckets, and into a comma-separated entry before a ':'.
KEY_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@click.command("create-key")
@click.argument("name")
@click.option("--admin", is_flag=True, help="Make an admin key, for ADMIN_API_KEYS.")
def create_key(name: str, admin: bool) -> None:
    """Print a new random key and its hashed entry to add to API_KEYS (or ADMIN_API_KEYS with --admin)."""
    if not KEY_NAME.fullmatch(name):
        raise click.BadParameter("use 1 to 64 letters, digits, '.', '_' or '-'", param_hint="NAME")
    key = secrets.token_urlsafe(32)
    variable = "ADMIN_API_KEYS" if admin else "API_KEYS"
    click.echo(f"key:   {key}")
    click.echo(f"entry: {name}:{HASH_PREFIX}{digest(key).hex()}")
    # The result is the two lines above, on stdout; the advice goes to stderr, so that a script can read the result.
    click.echo(f"Give the key to its client; add the entry to {variable} (comma-separated). Only the entry is kept.", err=True)


database_commands = AppGroup("db", help="The database of keys, the audit log and the usage ledger.")


@database_commands.command("upgrade")
def upgrade_database() -> None:
    """Apply the migrations the database has not had yet (the Procfile's release phase runs this)."""
    from genapi.database import upgrade

    database = current_app.extensions["genapi"]["database"]
    upgrade(database.url)
    click.echo(f"the database at {database.safe_url} is up to date", err=True)


key_commands = AppGroup("keys", help="Database keys: the same operations as the admin API, against the same database.")
CLI_ACTOR = "cli"  # who the audit log names for a change made here


def _engine():
    from genapi.database import schema_problem, upgrade

    database = current_app.extensions["genapi"]["database"]
    # As a server would at start-up: on a fresh clone, the first key comes before the first start.
    if database.is_sqlite and schema_problem(database.engine, database.url):
        upgrade(database.url)
    return database.engine


def _print(value) -> None:
    click.echo(json.dumps(value, indent=2))


def _validated(model, **fields):
    try:
        return model.model_validate_json(json.dumps(fields))  # as the admin API reads it: times as ISO 8601 text
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, p['loc'])) or 'value'}: {p['msg']}" for p in error.errors())
        raise click.UsageError(problems) from None


def _keyed(operation, key_id: str, *args):
    from genapi.admin import KeyFromEnvironment, KeyNotFound, KeyRevoked

    try:
        result = operation(_engine(), CLI_ACTOR, key_id, *args)
    except KeyNotFound:
        raise click.ClickException(f"no key has the id {key_id!r}") from None
    except KeyFromEnvironment:
        raise click.ClickException("this key is set in API_KEYS or ADMIN_API_KEYS; remove it there instead") from None
    except KeyRevoked:
        raise click.ClickException(f"the key {key_id!r} is revoked: it cannot be changed or rotated; make a new one") from None
    _print(result)


def _models(value: str | None) -> list[str] | None:
    return None if value is None else [model.strip() for model in value.split(",") if model.strip()]


@key_commands.command("create")
@click.argument("name")
@click.option("--admin", is_flag=True, help="An admin key: any model, /metrics and the admin API.")
@click.option("--rate-limit", help="The key's own limit, such as 100/minute; default RATE_LIMIT.")
@click.option("--allowed-models", help="The key's own models, comma-separated; default ALLOWED_MODELS.")
@click.option("--expires-at", help="When the key stops working, ISO 8601 (2027-01-31T00:00:00Z).")
@click.option("--token-budget", help='The key\'s own token budget, such as 50000/day, or "none"; default TOKEN_BUDGET.')
def create_database_key(name, admin, rate_limit, allowed_models, expires_at, token_budget) -> None:
    """Create a key; print it as JSON, its whole key under "key", this once."""
    from genapi.admin import KeyCreate, create_key

    fields = _validated(
        KeyCreate, name=name, role="admin" if admin else "user", rate_limit=rate_limit,
        allowed_models=_models(allowed_models), expires_at=expires_at, token_budget=token_budget,
    )
    _print(create_key(_engine(), CLI_ACTOR, fields))


@key_commands.command("list")
def list_database_keys() -> None:
    """List every key, those of API_KEYS and ADMIN_API_KEYS included; never a secret."""
    from genapi.admin import list_keys

    _print(list_keys(_engine(), current_app.extensions["genapi"]["keys"].environment_clients))


@key_commands.command("show")
@click.argument("key_id")
def show_database_key(key_id) -> None:
    """Print one key."""
    from genapi.admin import KeyNotFound, read_key

    try:
        _print(read_key(_engine(), key_id, current_app.extensions["genapi"]["keys"].environment_clients))
    except KeyNotFound:
        raise click.ClickException(f"no key has the id {key_id!r}") from None


@key_commands.command("update")
@click.argument("key_id")
@click.option("--name")
@click.option("--rate-limit", help='The key\'s own limit; "" goes back to RATE_LIMIT.')
@click.option("--allowed-models", help='Comma-separated; "" goes back to ALLOWED_MODELS.')
@click.option("--expires-at", help='ISO 8601; "" means never.')
@click.option("--token-budget", help='Such as 50000/day, or "none" for no budget; "" goes back to TOKEN_BUDGET.')
def update_database_key(key_id, name, rate_limit, allowed_models, expires_at, token_budget) -> None:
    """Change a key's name or limits; an option given as "" clears it."""
    from genapi.admin import KeyUpdate, update_key

    given = {"name": name, "rate_limit": rate_limit, "allowed_models": allowed_models, "expires_at": expires_at,
             "token_budget": token_budget}
    fields = {field: (value or None) for field, value in given.items() if value is not None}
    if "allowed_models" in fields:
        fields["allowed_models"] = _models(fields["allowed_models"])
    _keyed(update_key, key_id, _validated(KeyUpdate, **fields))


@key_commands.command("revoke")
@click.argument("key_id")
def revoke_database_key(key_id) -> None:
    """Revoke a key: every instance refuses it within KEY_CACHE_SECONDS."""
    from genapi.admin import revoke_key

    _keyed(revoke_key, key_id)


@key_commands.command("rotate")
@click.argument("key_id")
@click.option("--grace-seconds", type=click.IntRange(0, 7 * 24 * 3600), default=0, help="How long the old secret keeps working.")
def rotate_database_key(key_id, grace_seconds) -> None:
    """Give a key a new secret; print it, with the new whole key under "key", this once."""
    from genapi.admin import rotate_key

    _keyed(rotate_key, key_id, grace_seconds)


@key_commands.command("audit")
@click.option("--key-id", help="Only this key's entries.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100)
def audit_log(key_id, limit) -> None:
    """Print the audit log of admin actions, newest first."""
    from genapi.admin import KeyNotFound, read_audit

    try:
        _print(read_audit(_engine(), key_id, limit))
    except KeyNotFound:
        raise click.ClickException(f"no key has the id {key_id!r}") from None
