"""A key's own token budget, over TOKEN_BUDGET and ADMIN_TOKEN_BUDGET.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, so that every existing key keeps the global budget: "50000/day", "none", or NULL for the settings'.
    with op.batch_alter_table("api_keys") as table:
        table.add_column(sa.Column("token_budget", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as table:
        table.drop_column("token_budget")
