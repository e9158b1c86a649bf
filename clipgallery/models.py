"""SQLModel tables. Alembic owns the schema (alembic/versions); these classes describe it.

Every table and column carries a comment: `\\d+ images` in psql explains the schema.
"""

from __future__ import annotations

from datetime import datetime

from pgvector.sqlalchemy import Vector
from sqlalchemy import (
    BigInteger,
    Column,
    Computed,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import TSVECTOR
from sqlmodel import Field, SQLModel

HNSW_OPCLASS = {"cosine": "vector_cosine_ops", "l2": "vector_l2_ops", "ip": "vector_ip_ops", "l1": "vector_l1_ops"}
METRIC_OPERATORS = {"cosine": "<=>", "l2": "<->", "ip": "<#>", "l1": "<+>"}
HNSW_INDEX_NAME = "image_embeddings_embedding_hnsw"
# Wider vectors do not fit in a heap page: PostgreSQL must TOAST them.
MAX_IN_ROW_DIMENSION = 1900
# Full-text search document of an image: English stemming, the name weighted above the description.
# A fixed text search configuration: a generated column needs an immutable expression.
SEARCH_DOCUMENT_SQL = (
    "setweight(to_tsvector('english', name), 'A') || setweight(to_tsvector('english', description), 'B')"
)
SEARCH_DOCUMENT_INDEX_NAME = "images_search_document_gin"
# Used when the configured model cannot be resolved at the first migration: ViT-B-32's width.
# An empty gallery adopts the real model's dimension on first use.
DEFAULT_DIMENSION = 512


def hnsw_index_statements(settings) -> list[str]:
    """SQL that creates the HNSW index for the configured metric (used by migrations and re-embed)."""
    metric = settings.index_metric
    return [
        f"CREATE INDEX {HNSW_INDEX_NAME} ON image_embeddings USING hnsw (embedding {HNSW_OPCLASS[metric]}) "
        f"WITH (m = {int(settings.hnsw_m)}, ef_construction = {int(settings.hnsw_ef_construction)})",
        f"COMMENT ON INDEX {HNSW_INDEX_NAME} IS 'Approximate nearest-neighbour index ({metric}): serves "
        f"ORDER BY embedding {METRIC_OPERATORS[metric]} query LIMIT k'",
    ]


def _now_column(comment: str, onupdate: bool = False) -> Column:
    return Column(
        DateTime(timezone=True),
        nullable=False,
        server_default=func.now(),
        onupdate=func.now() if onupdate else None,
        comment=comment,
    )


class User(SQLModel, table=True):
    __tablename__ = "users"
    __table_args__ = {"comment": "People who can log in. Passwords are stored as Argon2id hashes only."}

    id: int | None = Field(default=None, primary_key=True, sa_column_kwargs={"comment": "User id"})
    username: str = Field(sa_column=Column(String(64), unique=True, nullable=False, comment="Login name, unique"))
    password_hash: str = Field(sa_column=Column(Text, nullable=False, comment="Argon2id hash (PHC string)"))
    is_admin: bool = Field(
        default=False, sa_column_kwargs={"comment": "May upload, edit and delete images", "server_default": "false"}
    )
    created_at: datetime | None = Field(default=None, sa_column=_now_column("When the user was created"))


class EmbeddingModel(SQLModel, table=True):
    __tablename__ = "embedding_models"
    __table_args__ = (
        UniqueConstraint("architecture", "weights", name="uq_embedding_models_identity"),
        {"comment": "CLIP models that produced stored vectors. Vectors of different models are never compared."},
    )

    id: int | None = Field(default=None, primary_key=True, sa_column_kwargs={"comment": "Model id"})
    architecture: str = Field(sa_column=Column(Text, nullable=False, comment="open_clip architecture, e.g. ViT-B-32"))
    weights: str = Field(
        sa_column=Column(
            Text,
            nullable=False,
            comment="Pretrained tag (e.g. laion2b_s34b_b79k) or sha256:<hex> of a local checkpoint",
        )
    )
    dimension: int = Field(sa_column=Column(Integer, nullable=False, comment="Length of the vectors"))
    created_at: datetime | None = Field(default=None, sa_column=_now_column("First use of this model"))


class Image(SQLModel, table=True):
    __tablename__ = "images"
    __table_args__ = (
        Index(SEARCH_DOCUMENT_INDEX_NAME, "search_document", postgresql_using="gin"),
        {"comment": "One row per distinct image file (by content). Files live under uploaded_files/."},
    )

    id: int | None = Field(default=None, primary_key=True, sa_column_kwargs={"comment": "Image id"})
    sha256: str = Field(
        sa_column=Column(
            String(64), unique=True, nullable=False, comment="SHA-256 of the uploaded bytes (hex); duplicates share it"
        )
    )
    original_filename: str = Field(
        sa_column=Column(Text, nullable=False, comment="File name as given by the uploader or on disk (display only)")
    )
    stored_path: str = Field(
        sa_column=Column(Text, nullable=False, comment="Served original, relative to uploaded_files/")
    )
    thumbnail_path: str = Field(
        sa_column=Column(
            Text,
            nullable=False,
            comment="Grid thumbnail (JPEG or WebP, CLIPGALLERY_THUMBNAIL_FORMAT), relative to uploaded_files/",
        )
    )
    name: str = Field(sa_column=Column(Text, nullable=False, comment="Display name"))
    description: str = Field(default="", sa_column=Column(Text, nullable=False, server_default="", comment="Free text"))
    mime_type: str = Field(
        sa_column=Column(String(32), nullable=False, comment="image/jpeg, image/png, image/webp or image/gif")
    )
    width: int = Field(sa_column=Column(Integer, nullable=False, comment="Pixels, after EXIF orientation"))
    height: int = Field(sa_column=Column(Integer, nullable=False, comment="Pixels, after EXIF orientation"))
    byte_size: int = Field(sa_column=Column(BigInteger, nullable=False, comment="Size of the served original in bytes"))
    uploaded_by: int | None = Field(
        default=None,
        sa_column=Column(
            Integer,
            ForeignKey("users.id", ondelete="SET NULL"),
            nullable=True,
            comment="users.id of the uploader; NULL for bulk-indexed files",
        ),
    )
    created_at: datetime | None = Field(default=None, sa_column=_now_column("When the image was added"))
    updated_at: datetime | None = Field(default=None, sa_column=_now_column("Last change of the row", onupdate=True))
    search_document: str | None = Field(
        default=None,
        sa_column=Column(
            TSVECTOR,
            Computed(SEARCH_DOCUMENT_SQL, persisted=True),
            comment="Full-text search document (generated from name and description; GIN-indexed): "
            "search_document @@ websearch_to_tsquery('english', 'words')",
        ),
    )


class ImageEmbedding(SQLModel, table=True):
    __tablename__ = "image_embeddings"
    __table_args__ = {
        "comment": "CLIP vector of each image (1:1 with images), L2-normalised, with the model that made it."
    }

    image_id: int = Field(
        sa_column=Column(
            Integer,
            ForeignKey("images.id", ondelete="CASCADE"),
            primary_key=True,
            comment="images.id",
        )
    )
    model_id: int = Field(
        sa_column=Column(
            Integer,
            ForeignKey("embedding_models.id"),
            nullable=False,
            index=True,
            comment="embedding_models.id of the model that made the vector",
        )
    )
    # The dimension is fixed by the migration from the configured model (see alembic/versions).
    embedding: list[float] = Field(
        sa_column=Column(
            Vector(),
            nullable=False,
            comment="L2-normalised CLIP image vector; cosine distance: embedding <=> query",
        )
    )
    created_at: datetime | None = Field(default=None, sa_column=_now_column("When the vector was computed"))


class IndexedFile(SQLModel, table=True):
    __tablename__ = "indexed_files"
    __table_args__ = (
        Index("ix_indexed_files_image_id", "image_id"),
        {"comment": "Files found by `clipgallery index`, so re-runs skip unchanged files and find vanished ones."},
    )

    path: str = Field(sa_column=Column(Text, primary_key=True, comment="Absolute path of the file when indexed"))
    size: int = Field(sa_column=Column(BigInteger, nullable=False, comment="File size in bytes when indexed"))
    mtime_ns: int = Field(sa_column=Column(BigInteger, nullable=False, comment="Modification time (ns) when indexed"))
    image_id: int = Field(
        sa_column=Column(
            Integer,
            ForeignKey("images.id", ondelete="CASCADE"),
            nullable=False,
            comment="The image this file holds",
        )
    )
    indexed_at: datetime | None = Field(default=None, sa_column=_now_column("Last time the file was checked", True))


class UserSession(SQLModel, table=True):
    __tablename__ = "user_sessions"
    __table_args__ = {"comment": "Login sessions of the web app. Only a SHA-256 of each token is stored."}

    id: int | None = Field(default=None, primary_key=True, sa_column_kwargs={"comment": "Session id"})
    token_hash: str = Field(
        sa_column=Column(String(64), unique=True, nullable=False, comment="SHA-256 (hex) of the session token")
    )
    user_id: int = Field(
        sa_column=Column(
            Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, comment="users.id of the session"
        )
    )
    created_at: datetime | None = Field(default=None, sa_column=_now_column("Login time"))
    expires_at: datetime = Field(
        sa_column=Column(DateTime(timezone=True), nullable=False, comment="The session ends at this time")
    )
    last_seen_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True, comment="Last request with this session")
    )


class LoginAttempt(SQLModel, table=True):
    __tablename__ = "login_attempts"
    __table_args__ = {"comment": "Failed logins per (lower-cased) user name, for the brute-force throttle."}

    username: str = Field(sa_column=Column(Text, primary_key=True, comment="User name as typed, lower-cased"))
    failures: int = Field(sa_column=Column(Integer, nullable=False, comment="Failed logins since the last success"))
    last_failure_at: datetime = Field(
        sa_column=Column(DateTime(timezone=True), nullable=False, comment="Time of the latest failure")
    )
    locked_until: datetime | None = Field(
        default=None,
        sa_column=Column(DateTime(timezone=True), nullable=True, comment="No login for this name before this time"),
    )


class ApiToken(SQLModel, table=True):
    __tablename__ = "api_tokens"
    __table_args__ = {"comment": "Bearer tokens for the JSON API, issued to admins. Only a SHA-256 is stored."}

    id: int | None = Field(default=None, primary_key=True, sa_column_kwargs={"comment": "Token id"})
    user_id: int = Field(
        sa_column=Column(
            Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, comment="users.id of the owner"
        )
    )
    name: str = Field(sa_column=Column(Text, nullable=False, comment="What the token is for"))
    token_hash: str = Field(
        sa_column=Column(String(64), unique=True, nullable=False, comment="SHA-256 (hex) of the token")
    )
    created_at: datetime | None = Field(default=None, sa_column=_now_column("When the token was issued"))
    last_used_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True, comment="Last API call with the token")
    )
    expires_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True, comment="NULL: never expires")
    )
