"""`flask --app app create-key NAME`: a new client key, and the hashed entry that lets it in."""

import re
import secrets

import click
from flask import current_app
from flask.cli import AppGroup

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
    click.echo(f"Give the key to its client; add the entry to {variable} (comma-separated). Only the entry is kept.")


database_commands = AppGroup("db", help="The database of keys, the audit log and the usage ledger.")


@database_commands.command("upgrade")
def upgrade_database() -> None:
    """Apply the migrations the database has not had yet (the Procfile's release phase runs this)."""
    from genapi.database import upgrade

    database = current_app.extensions["genapi"]["database"]
    upgrade(database.url)
    click.echo(f"the database at {database.safe_url} is up to date", err=True)
