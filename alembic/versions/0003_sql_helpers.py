"""SQL helpers for psql users: the gallery_images view and the similar_images / nearest_images
functions (see docs/sql.md).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The view must not name image_embeddings.embedding: a view pins the type of every column it
    # reads, and `clipgallery reembed` changes the vector dimension with ALTER COLUMN ... TYPE.
    # (SQL function bodies are not dependency-tracked, so the functions below are fine.)
    op.execute(
        """
        CREATE VIEW gallery_images AS
        SELECT i.id,
               i.name,
               i.description,
               i.original_filename,
               i.mime_type,
               i.width,
               i.height,
               i.byte_size,
               u.username AS uploaded_by,
               i.created_at,
               i.updated_at,
               '/files/' || i.stored_path AS original_url,
               '/files/' || i.thumbnail_path AS thumbnail_url,
               m.architecture || ' / ' || m.weights AS model,
               e.image_id IS NOT NULL AS has_vector
        FROM images i
        LEFT JOIN users u ON u.id = i.uploaded_by
        LEFT JOIN image_embeddings e ON e.image_id = i.id
        LEFT JOIN embedding_models m ON m.id = e.model_id
        """
    )
    op.execute(
        "COMMENT ON VIEW gallery_images IS "
        "'Images with their metadata, uploader name, file URLs and model: the table to start from in psql'"
    )
    # The query vector comes from a scalar subquery, so the planner treats it as a constant and
    # can use the HNSW index; a join on the vector could not.
    op.execute(
        """
        CREATE FUNCTION similar_images(image_id integer, k integer DEFAULT 10)
        RETURNS TABLE (id integer, name text, distance double precision, similarity double precision)
        LANGUAGE sql STABLE STRICT
        AS $$
            SELECT i.id, i.name,
                   e.embedding <=> (SELECT q.embedding FROM image_embeddings q WHERE q.image_id = $1) AS distance,
                   1 - (e.embedding <=> (SELECT q.embedding FROM image_embeddings q WHERE q.image_id = $1))
            FROM image_embeddings e
            JOIN images i ON i.id = e.image_id
            WHERE e.image_id <> $1
              AND e.model_id = (SELECT q.model_id FROM image_embeddings q WHERE q.image_id = $1)
            ORDER BY e.embedding <=> (SELECT q.embedding FROM image_embeddings q WHERE q.image_id = $1), i.id
            LIMIT k
        $$
        """
    )
    op.execute(
        "COMMENT ON FUNCTION similar_images(integer, integer) IS "
        "'The k images most similar to a stored image (cosine distance, HNSW index), the image itself left out'"
    )
    op.execute(
        """
        CREATE FUNCTION nearest_images(query vector, k integer DEFAULT 10)
        RETURNS TABLE (id integer, name text, distance double precision, similarity double precision)
        LANGUAGE sql STABLE STRICT
        AS $$
            SELECT i.id, i.name, e.embedding <=> $1, 1 - (e.embedding <=> $1)
            FROM image_embeddings e
            JOIN images i ON i.id = e.image_id
            ORDER BY e.embedding <=> $1, i.id
            LIMIT k
        $$
        """
    )
    op.execute(
        "COMMENT ON FUNCTION nearest_images(vector, integer) IS "
        "'The k images nearest to a query vector (e.g. a CLIP text embedding computed elsewhere), by cosine distance'"
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS nearest_images(vector, integer)")
    op.execute("DROP FUNCTION IF EXISTS similar_images(integer, integer)")
    op.execute("DROP VIEW IF EXISTS gallery_images")
