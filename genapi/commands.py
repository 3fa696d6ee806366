"""`flask --app app create-key NAME`: a new client key, and the hashed entry that lets it in."""

import re
import secrets

import click

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
