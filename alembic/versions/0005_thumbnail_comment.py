"""images.thumbnail_path: thumbnails are JPEG by default now (CLIPGALLERY_THUMBNAIL_FORMAT)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_COMMENT = "Grid thumbnail (WebP), relative to uploaded_files/"
NEW_COMMENT = "Grid thumbnail (JPEG or WebP, CLIPGALLERY_THUMBNAIL_FORMAT), relative to uploaded_files/"


def _set_comment(comment: str, existing_comment: str) -> None:
    op.alter_column(
        "images",
        "thumbnail_path",
        comment=comment,
        existing_comment=existing_comment,
        existing_type=sa.Text(),
        existing_nullable=False,
    )


def upgrade() -> None:
    _set_comment(NEW_COMMENT, OLD_COMMENT)


def downgrade() -> None:
    _set_comment(OLD_COMMENT, NEW_COMMENT)
