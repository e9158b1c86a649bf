"""All settings in one place, read from environment variables.

Every variable is optional; the defaults give a working gallery on the embedded database.
`clipgallery config` prints the values in force.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

METRICS = ("cosine", "l2", "ip", "l1")
# Numeric precision of each tower: fp32 as trained, bf16, or int8 (dynamic quantisation of its
# Linear layers). "auto" picks the fastest the CPU has natively within the fidelity criterion
# (towers.resolve_precision): for images bf16 with AMX, else int8 with VNNI, else bf16 where
# native, else int8 on AVX2 (for a ViT), else fp32; for text queries int8 with VNNI, else bf16
# where native, else int8 on AVX2, else fp32. "auto" keeps int8 only for a model whose vectors it
# leaves close to fp32's on probe inputs. See docs/benchmarks.md.
PRECISIONS = ("auto", "fp32", "bf16", "int8")
TEXT_PRECISIONS = PRECISIONS
THUMBNAIL_FORMATS = ("jpeg", "webp")


class ConfigError(ValueError):
    """A setting has a value clipgallery cannot use."""


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value.strip() == "" else value.strip()


def _env_int(name: str, default: int, minimum: int = 0) -> int:
    raw = _env(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _env_float(name: str, default: float, minimum: float, maximum: float) -> float:
    raw = _env(name, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name} must be between {minimum} and {maximum}, got {value}")
    return value


def _env_bool(name: str, default: bool) -> bool:
    raw = _env(name, "1" if default else "0").lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _env_path(name: str, default: Path) -> Path:
    return Path(_env(name, str(default))).expanduser().resolve()


@dataclass(frozen=True)
class Settings:
    # Database: unset means "start the embedded PostgreSQL + pgvector server under state_dir".
    database_url: str | None = None
    state_dir: Path = PROJECT_ROOT / ".state"
    # "auto" sizes the embedded server from the machine's memory so an HNSW index fits in cache.
    pg_shared_buffers: str = "auto"
    pg_maintenance_work_mem: str = "auto"

    # Files
    upload_dir: Path = PROJECT_ROOT / "uploaded_files"
    max_upload_bytes: int = 30 * 1024 * 1024
    max_image_pixels: int = 64_000_000
    thumbnail_size: int = 384
    # jpeg: a tenth of WebP's encoding time (0.2 against 2.2 ms per thumbnail here, made for every
    # indexed image beside the model) for files about 8 % larger (docs/benchmarks.md).
    thumbnail_format: str = "jpeg"

    # Model: an open_clip architecture plus a pretrained tag or a checkpoint file,
    # or a model directory (open_clip_config.json + weights) as written by `clipgallery model`.
    model_name: str = "ViT-B-32"
    pretrained: str = "laion2b_s34b_b79k"
    model_preload: bool = True
    torch_threads: int = 0  # 0: one per core
    # Threads for one query's forward pass (a text, or one image); 0: torch_threads. See
    # Embedder._forward_pass for why one is the default.
    query_threads: int = 1
    # Image queries waiting for the image tower share one forward pass, up to this many (1: never).
    query_batch: int = 16
    embed_batch_size: int = 32
    precision: str = "auto"  # of the image tower
    text_precision: str = "auto"
    # Run the towers as TorchScript traces (no GIL per operation; towers.trace_image_tower and
    # trace_text_tower).
    trace_image_tower: bool = True
    trace_text_tower: bool = True

    # Access: sessions end after session_hours; a private gallery needs a login to search.
    session_hours: int = 12
    private_gallery: bool = False

    # Search
    index_metric: str = "cosine"
    # m 48 / ef_construction 256, from the bench's curves (docs/benchmarks.md, docs/scaling.md): on
    # its hard synthetic data recall@10 levels off whatever ef_search, at a height set by the graph's
    # build (100k vectors: 0.89 m 16, 0.98 m 32 and 0.97 m 48 at ef_construction 128, 0.99 m 48 at
    # 256; builds vary by a few points). At 1M vectors of the trained fashion model, image-like
    # queries: 0.942 at ef_construction 128, 0.958 at 256 (same index size, build 1.65x longer: 16
    # instead of 10 minutes here); the random-weight model's 1M set, harder still, did not gain
    # (0.927 -> 0.902, one build each).
    hnsw_m: int = 48
    hnsw_ef_construction: int = 256
    # A gallery with fewer vectors than this has no HNSW index: its searches scan every vector and
    # find every true neighbour, as fast as with the index at that size (5,000 random-weight
    # ViT-B-32 vectors, a repeated text query through search_text: 2.8-3.2 ms p50 either way; the
    # planner scans even with the index there), where the graph found 0.82-0.92 of a text query's
    # top 10 at 4k; and indexing runs into it skip the graph's rebuild (2.6 s at 5k). At 10k the
    # scan costs 4.2-4.6 ms against 1.9-2.5 with the index (docs/scaling.md). The index is built
    # once the gallery reaches this size and dropped only below half of it (`db.fit_vector_index`).
    # 0: always indexed.
    vector_index_min_vectors: int = 5_000
    # ef_search per kind of query. A text query lies far from every image (CLIP's modality gap), so
    # its graph walk needs a wide beam: with the trained fashion model at 100k vectors its
    # recall@10 is 0.61 / 0.75 / 0.84 / 0.88 at ef_search 40 / 100 / 200 / 300; from 100 on, each
    # step costs ≈ 1 ms (SQL p50 1.8 / 2.9 / 3.8 ms, a whole text query 8.0 / 9.1 / 10.3; 2026-11-29,
    # docs/scaling.md#recall-per-kind-of-query). An image's neighbours are close: 1.000 from
    # ef_search 10 there, and on the fashion model's 1M set 0.958 at 40 against 0.963 at 100 (SQL
    # p95 3.3 against 4.0 ms).
    hnsw_ef_search: int = 200  # text queries, and vectors of unknown origin
    hnsw_ef_search_image: int = 40  # image queries: upload, URL, "more like this"
    default_k: int = 20
    max_k: int = 500

    # Near-duplicates (`clipgallery duplicates`, /admin/duplicates): the largest cosine distance
    # (1 - similarity) between two images that count as near copies of each other.
    duplicate_distance: float = 0.05
    # Hybrid text search: PostgreSQL full-text search over names and descriptions fused with the
    # vector ranking by reciprocal rank fusion (docs/quality.md#hybrid-search). Each side
    # contributes its best `hybrid_depth` images (at least the page being asked for).
    hybrid_search: bool = True
    hybrid_depth: int = 40
    rrf_k: int = 60
    # Words found in more than this share of all images are left out of the keyword side.
    hybrid_common_fraction: float = 0.2

    # Search by image URL. TEST-ONLY escape hatch: hosts (as written in URLs, e.g. "127.0.0.1")
    # whose addresses skip the public-address check, so tests can fetch from loopback servers.
    # Any entry in production re-opens server-side request forgery to that host; keep it empty.
    fetch_allow_hosts: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.index_metric not in METRICS:
            raise ConfigError(
                f"CLIPGALLERY_INDEX_METRIC must be one of {', '.join(METRICS)}, got {self.index_metric!r}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"CLIPGALLERY_PRECISION must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.thumbnail_format not in THUMBNAIL_FORMATS:
            raise ConfigError(
                f"CLIPGALLERY_THUMBNAIL_FORMAT must be one of {', '.join(THUMBNAIL_FORMATS)}, "
                f"got {self.thumbnail_format!r}"
            )
        if self.text_precision not in TEXT_PRECISIONS:
            raise ConfigError(
                f"CLIPGALLERY_TEXT_PRECISION must be one of {', '.join(TEXT_PRECISIONS)}, got {self.text_precision!r}"
            )

    @property
    def pgdata_dir(self) -> Path:
        return self.state_dir / "pgdata"

    @property
    def uses_embedded_database(self) -> bool:
        return self.database_url is None

    def with_overrides(self, **changes: object) -> Settings:
        return replace(self, **changes)

    def describe(self) -> list[tuple[str, str]]:
        """(name, value) pairs for display, with the password of a database URL hidden."""
        rows = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "database_url" and value:
                value = _hide_password(value)
            rows.append((f.name, "(embedded)" if f.name == "database_url" and value is None else str(value)))
        return rows


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(unparseable URL)"


def normalise_database_url(url: str) -> str:
    """Accept postgres:// and postgresql:// URLs and use the psycopg 3 driver for them."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def load_settings() -> Settings:
    """Read settings from the environment (see README "Configuration")."""
    database_url = os.environ.get("DATABASE_URL") or os.environ.get("CLIPGALLERY_DATABASE_URL")
    defaults = Settings()
    return Settings(
        database_url=normalise_database_url(database_url.strip()) if database_url else None,
        state_dir=_env_path("CLIPGALLERY_STATE_DIR", defaults.state_dir),
        pg_shared_buffers=_env("CLIPGALLERY_PG_SHARED_BUFFERS", defaults.pg_shared_buffers),
        pg_maintenance_work_mem=_env("CLIPGALLERY_PG_MAINTENANCE_WORK_MEM", defaults.pg_maintenance_work_mem),
        upload_dir=_env_path("CLIPGALLERY_UPLOAD_DIR", defaults.upload_dir),
        max_upload_bytes=_env_int("CLIPGALLERY_MAX_UPLOAD_BYTES", defaults.max_upload_bytes, 1),
        max_image_pixels=_env_int("CLIPGALLERY_MAX_IMAGE_PIXELS", defaults.max_image_pixels, 1),
        thumbnail_size=_env_int("CLIPGALLERY_THUMBNAIL_SIZE", defaults.thumbnail_size, 16),
        thumbnail_format=_env("CLIPGALLERY_THUMBNAIL_FORMAT", defaults.thumbnail_format).lower(),
        model_name=_env("CLIPGALLERY_MODEL", defaults.model_name),
        pretrained=_env("CLIPGALLERY_PRETRAINED", defaults.pretrained),
        model_preload=_env_bool("CLIPGALLERY_MODEL_PRELOAD", defaults.model_preload),
        torch_threads=_env_int("CLIPGALLERY_TORCH_THREADS", defaults.torch_threads, 0),
        query_threads=_env_int("CLIPGALLERY_QUERY_THREADS", defaults.query_threads, 0),
        query_batch=_env_int("CLIPGALLERY_QUERY_BATCH", defaults.query_batch, 1),
        embed_batch_size=_env_int("CLIPGALLERY_EMBED_BATCH_SIZE", defaults.embed_batch_size, 1),
        precision=_env("CLIPGALLERY_PRECISION", defaults.precision).lower(),
        text_precision=_env("CLIPGALLERY_TEXT_PRECISION", defaults.text_precision).lower(),
        trace_image_tower=_env_bool("CLIPGALLERY_TRACE_IMAGE_TOWER", defaults.trace_image_tower),
        trace_text_tower=_env_bool("CLIPGALLERY_TRACE_TEXT_TOWER", defaults.trace_text_tower),
        session_hours=_env_int("CLIPGALLERY_SESSION_HOURS", defaults.session_hours, 1),
        private_gallery=_env_bool("CLIPGALLERY_PRIVATE", defaults.private_gallery),
        index_metric=_env("CLIPGALLERY_INDEX_METRIC", defaults.index_metric).lower(),
        hnsw_m=_env_int("CLIPGALLERY_HNSW_M", defaults.hnsw_m, 2),
        hnsw_ef_construction=_env_int("CLIPGALLERY_HNSW_EF_CONSTRUCTION", defaults.hnsw_ef_construction, 4),
        vector_index_min_vectors=_env_int("CLIPGALLERY_VECTOR_INDEX_MIN_VECTORS", defaults.vector_index_min_vectors, 0),
        hnsw_ef_search=_env_int("CLIPGALLERY_HNSW_EF_SEARCH", defaults.hnsw_ef_search, 1),
        hnsw_ef_search_image=_env_int("CLIPGALLERY_HNSW_EF_SEARCH_IMAGE", defaults.hnsw_ef_search_image, 1),
        default_k=_env_int("CLIPGALLERY_DEFAULT_K", defaults.default_k, 1),
        max_k=_env_int("CLIPGALLERY_MAX_K", defaults.max_k, 1),
        duplicate_distance=_env_float("CLIPGALLERY_DUPLICATE_DISTANCE", defaults.duplicate_distance, 0.0, 1.0),
        hybrid_search=_env_bool("CLIPGALLERY_HYBRID_SEARCH", defaults.hybrid_search),
        hybrid_depth=_env_int("CLIPGALLERY_HYBRID_DEPTH", defaults.hybrid_depth, 1),
        rrf_k=_env_int("CLIPGALLERY_RRF_K", defaults.rrf_k, 1),
        hybrid_common_fraction=_env_float(
            "CLIPGALLERY_HYBRID_COMMON_FRACTION", defaults.hybrid_common_fraction, 0.0, 1.0
        ),
        fetch_allow_hosts=frozenset(
            h.strip().lower() for h in _env("CLIPGALLERY_FETCH_ALLOW_HOSTS", "").split(",") if h.strip()
        ),
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once. Tests build their own `Settings` instead."""
    return load_settings()
