"""Alembic's entry point: migrate the database genapi's settings name (DATABASE_URL, or the SQLite default)."""

from alembic import context
from sqlalchemy import create_engine

from genapi.models import metadata

config = context.config
url = config.attributes.get("url")
if url is None:  # run as `alembic upgrade head`, not through genapi.database.upgrade
    from config import Settings
    from genapi.database import database_url

    url = database_url(Settings())

engine = create_engine(url)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
