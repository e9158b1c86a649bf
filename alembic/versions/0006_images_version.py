"""images_version: a counter every change to the images table moves on (for search caches)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A sequence, not a one-row table: nextval takes no row lock, so concurrent writers (a bulk
    # run and an upload) never queue behind each other's open transactions for it. A sequence is
    # not transactional, so a reader must also know that no writer was still in progress when
    # it read the rows (`search.IMAGES_STATE_COLUMNS` checks that).
    op.execute("CREATE SEQUENCE images_version")
    # Called once, so every later change gives a last_value not seen before (a fresh sequence's
    # last_value is already 1, and stays 1 after its first nextval).
    op.execute("SELECT setval('images_version', 1)")
    op.execute(
        "COMMENT ON SEQUENCE images_version IS "
        "'Moves on with every INSERT, UPDATE, DELETE or TRUNCATE of images (statement trigger): "
        "SELECT last_value FROM images_version tells whether the images changed since you last looked'"
    )
    op.execute(
        """
        CREATE FUNCTION images_version_bump() RETURNS trigger
        LANGUAGE plpgsql
        AS $$
        BEGIN
            PERFORM nextval('images_version');
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER images_version_bump AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON images "
        "FOR EACH STATEMENT EXECUTE FUNCTION images_version_bump()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER images_version_bump ON images")
    op.execute("DROP FUNCTION images_version_bump()")
    op.execute("DROP SEQUENCE images_version")
