"""Initial schema: pgvector, users, models, images, their vectors (HNSW) and indexed files.

The vector column's dimension and the HNSW operator class are taken from the configured model
and metric when this migration runs (a gallery is created for one model; `clipgallery reembed`
changes the dimension later if the model changes).

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import pgvector.sqlalchemy
import sqlalchemy as sa
from alembic import context, op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _settings():
    from clipgallery.config import get_settings

    return context.config.attributes.get("settings") or get_settings()


def _timestamp(comment: str) -> sa.Column:
    return sa.Column(
        "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False, comment=comment
    )


def upgrade() -> None:
    from clipgallery.embedding import ModelUnavailableError, configured_dimension
    from clipgallery.models import DEFAULT_DIMENSION, MAX_IN_ROW_DIMENSION

    settings = _settings()
    try:
        dimension = configured_dimension(settings)
    except ModelUnavailableError:
        # No model yet: the schema must not wait for one. The empty gallery adopts the
        # model's dimension when a model first writes or searches.
        dimension = DEFAULT_DIMENSION

    op.execute("CREATE EXTENSION IF NOT EXISTS vector")

    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), primary_key=True, comment="User id"),
        sa.Column("username", sa.String(64), nullable=False, unique=True, comment="Login name, unique"),
        sa.Column("password_hash", sa.Text(), nullable=False, comment="Argon2id hash (PHC string)"),
        sa.Column("is_admin", sa.Boolean(), nullable=False, comment="May upload, edit and delete images"),
        _timestamp("When the user was created"),
        comment="People who can log in. Passwords are stored as Argon2id hashes only.",
    )
    op.create_table(
        "embedding_models",
        sa.Column("id", sa.Integer(), primary_key=True, comment="Model id"),
        sa.Column("architecture", sa.Text(), nullable=False, comment="open_clip architecture, e.g. ViT-B-32"),
        sa.Column(
            "weights",
            sa.Text(),
            nullable=False,
            comment="Pretrained tag (e.g. laion2b_s34b_b79k) or sha256:<hex> of a local checkpoint",
        ),
        sa.Column("dimension", sa.Integer(), nullable=False, comment="Length of the vectors"),
        _timestamp("First use of this model"),
        sa.UniqueConstraint("architecture", "weights", name="uq_embedding_models_identity"),
        comment="CLIP models that produced stored vectors. Vectors of different models are never compared.",
    )
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), primary_key=True, comment="Image id"),
        sa.Column(
            "sha256",
            sa.String(64),
            nullable=False,
            unique=True,
            comment="SHA-256 of the uploaded bytes (hex); duplicates share it",
        ),
        sa.Column(
            "original_filename",
            sa.Text(),
            nullable=False,
            comment="File name as given by the uploader or on disk (display only)",
        ),
        sa.Column("stored_path", sa.Text(), nullable=False, comment="Served original, relative to uploaded_files/"),
        sa.Column(
            "thumbnail_path", sa.Text(), nullable=False, comment="Grid thumbnail (WebP), relative to uploaded_files/"
        ),
        sa.Column("name", sa.Text(), nullable=False, comment="Display name"),
        sa.Column("description", sa.Text(), nullable=False, server_default="", comment="Free text"),
        sa.Column("mime_type", sa.String(32), nullable=False, comment="image/jpeg, image/png, image/webp or image/gif"),
        sa.Column("width", sa.Integer(), nullable=False, comment="Pixels, after EXIF orientation"),
        sa.Column("height", sa.Integer(), nullable=False, comment="Pixels, after EXIF orientation"),
        sa.Column("byte_size", sa.BigInteger(), nullable=False, comment="Size of the served original in bytes"),
        sa.Column(
            "uploaded_by",
            sa.Integer(),
            sa.ForeignKey("users.id", ondelete="SET NULL"),
            nullable=True,
            comment="users.id of the uploader; NULL for bulk-indexed files",
        ),
        _timestamp("When the image was added"),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
            comment="Last change of the row",
        ),
        comment="One row per distinct image file (by content). Files live under uploaded_files/.",
    )
    op.create_table(
        "image_embeddings",
        sa.Column(
            "image_id",
            sa.Integer(),
            sa.ForeignKey("images.id", ondelete="CASCADE"),
            primary_key=True,
            comment="images.id",
        ),
        sa.Column(
            "model_id",
            sa.Integer(),
            sa.ForeignKey("embedding_models.id"),
            nullable=False,
            comment="embedding_models.id of the model that made the vector",
        ),
        sa.Column(
            "embedding",
            pgvector.sqlalchemy.Vector(dimension),
            nullable=False,
            comment="L2-normalised CLIP image vector; cosine distance: embedding <=> query",
        ),
        _timestamp("When the vector was computed"),
        comment="CLIP vector of each image (1:1 with images), L2-normalised, with the model that made it.",
    )
    op.create_index("ix_image_embeddings_model_id", "image_embeddings", ["model_id"])
    if dimension <= MAX_IN_ROW_DIMENSION:
        # A 512-d vector is 2 KB: by default PostgreSQL moves it out of line (TOAST), which
        # makes exact scans ~40x slower. PLAIN keeps it in the row.
        op.execute("ALTER TABLE image_embeddings ALTER COLUMN embedding SET STORAGE PLAIN")
    create_hnsw_index(settings)

    op.create_table(
        "indexed_files",
        sa.Column("path", sa.Text(), primary_key=True, comment="Absolute path of the file when indexed"),
        sa.Column("size", sa.BigInteger(), nullable=False, comment="File size in bytes when indexed"),
        sa.Column("mtime_ns", sa.BigInteger(), nullable=False, comment="Modification time (ns) when indexed"),
        sa.Column(
            "image_id",
            sa.Integer(),
            sa.ForeignKey("images.id", ondelete="CASCADE"),
            nullable=False,
            comment="The image this file holds",
        ),
        sa.Column(
            "indexed_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
            comment="Last time the file was checked",
        ),
        comment="Files found by `clipgallery index`, so re-runs skip unchanged files and find vanished ones.",
    )
    op.create_index("ix_indexed_files_image_id", "indexed_files", ["image_id"])


def create_hnsw_index(settings) -> None:
    from clipgallery.models import hnsw_index_statements

    for statement in hnsw_index_statements(settings):
        op.execute(statement)


def downgrade() -> None:
    op.drop_table("indexed_files")
    op.drop_table("image_embeddings")
    op.drop_table("images")
    op.drop_table("embedding_models")
    op.drop_table("users")
    # The extension stays: other schemas in the database may use it.
