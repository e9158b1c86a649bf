"""full-text search document on images, for hybrid search

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# Written out rather than imported: a migration must keep doing what it did when it was written.
SEARCH_DOCUMENT_SQL = (
    "setweight(to_tsvector('english', name), 'A') || setweight(to_tsvector('english', description), 'B')"
)
SEARCH_DOCUMENT_INDEX_NAME = "images_search_document_gin"

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A stored generated column: PostgreSQL keeps it in step with every insert and update of the
    # name or description, whoever writes them (the app, the CLI or an UPDATE in psql).
    op.add_column(
        "images",
        sa.Column(
            "search_document",
            postgresql.TSVECTOR(),
            sa.Computed(SEARCH_DOCUMENT_SQL, persisted=True),
            nullable=True,
            comment="Full-text search document (generated from name and description; GIN-indexed): "
            "search_document @@ websearch_to_tsquery('english', 'words')",
        ),
    )
    op.create_index(SEARCH_DOCUMENT_INDEX_NAME, "images", ["search_document"], postgresql_using="gin")


def downgrade() -> None:
    op.drop_index(SEARCH_DOCUMENT_INDEX_NAME, table_name="images")
    op.drop_column("images", "search_document")
