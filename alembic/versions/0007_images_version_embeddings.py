"""images_version also moves on with every change to image_embeddings

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COMMENT = (
    "Moves on with every INSERT, UPDATE, DELETE or TRUNCATE of images or image_embeddings (statement "
    "triggers): SELECT last_value FROM images_version tells whether the images or their vectors changed "
    "since you last looked"
)


def upgrade() -> None:
    # Search remembers whole result pages under the version (`search.search_vector`), and a page
    # depends on the vectors as much as on the rows of images: a re-embedding, or a vector written
    # by hand in psql, must show at once too.
    op.execute(
        "CREATE TRIGGER images_version_bump AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON image_embeddings "
        "FOR EACH STATEMENT EXECUTE FUNCTION images_version_bump()"
    )
    op.execute(f"COMMENT ON SEQUENCE images_version IS '{COMMENT}'")


def downgrade() -> None:
    op.execute("DROP TRIGGER images_version_bump ON image_embeddings")
    op.execute(
        "COMMENT ON SEQUENCE images_version IS "
        "'Moves on with every INSERT, UPDATE, DELETE or TRUNCATE of images (statement trigger): "
        "SELECT last_value FROM images_version tells whether the images changed since you last looked'"
    )
