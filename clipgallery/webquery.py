"""What the web pages ask of the services, in one place the pages can call from a worker thread.

The pages hold no SQL and no model code: they turn the address bar into query options here,
call one function per user action, and get back only what they render (ids, names, URLs,
formatted scores). Errors the user can act on become one calm sentence (`describe_error`).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from urllib.parse import urlencode

from clipgallery import db
from clipgallery.config import Settings
from clipgallery.embedding import ModelUnavailableError, get_embedder
from clipgallery.fetch import FetchError, fetch_for_settings
from clipgallery.gallery import (
    MIME_TYPES,
    SORTS,
    BrowsePage,
    ImageFilters,
    ModelMismatchError,
    NotFoundError,
    browse_images,
    count_images,
    get_image,
    uploader_names,
)
from clipgallery.imaging import RejectedImage, make_thumbnail
from clipgallery.models import User
from clipgallery.results import SearchPage, format_score
from clipgallery.search import (
    InvalidQuery,
    encode_query_image,
    search_by_vector,
    search_similar,
    search_text,
)

log = logging.getLogger(__name__)

# The web pages show at most this many results at once (big lists stay out of page state).
WEB_MAX_K = 100
K_CHOICES = ("10", "20", "40", "60", "100")
MIN_SIMILARITY_CHOICES = ("any", "0.1", "0.2", "0.25", "0.3", "0.5", "0.7", "0.9")
BROWSE_PAGE_SIZE = 40
# Short names in the address bar for the stored MIME types.
FORMATS = {mime.split("/")[1]: mime for mime in MIME_TYPES}
FORMAT_LABELS = {"jpeg": "JPEG", "png": "PNG", "webp": "WebP", "gif": "GIF"}
ANY = "any"
PREVIEW_SIZE = 160


@dataclass(frozen=True)
class Tile:
    """One result tile: everything a grid cell shows, nothing more."""

    id: int
    name: str
    description: str
    thumbnail_url: str
    score: str = ""  # "0.873"; empty when browsing
    score_title: str = ""  # what the number is, for a tooltip
    text_match: bool = False  # hybrid search ranked it up for the query's words (marked on its badge)


@dataclass(frozen=True)
class QueryOptions:
    k: int
    page: int
    metric: str
    min_similarity: float | None

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.k


@dataclass(frozen=True)
class FilterParams:
    """The filters as the address bar and the form fields spell them (strings, "" or "any" = off)."""

    text: str = ""
    uploader: str = ""
    date_from: str = ""
    date_to: str = ""
    fmt: str = ""

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> FilterParams:
        return cls(
            text=params.get("text", "").strip(),
            uploader=params.get("by", "").strip(),
            date_from=params.get("from", "").strip(),
            date_to=params.get("to", "").strip(),
            fmt=params.get("format", "").strip().lower(),
        )

    def to_params(self) -> dict[str, str]:
        pairs = {
            "text": self.text.strip(),
            "by": "" if self.uploader == ANY else self.uploader,
            "from": self.date_from,
            "to": self.date_to,
            "format": "" if self.fmt == ANY else self.fmt,
        }
        return {key: value for key, value in pairs.items() if value}

    @property
    def count(self) -> int:
        return len(self.to_params())

    def to_filters(self) -> ImageFilters:
        """Raises InvalidQuery for a malformed date or an unknown format."""
        params = self.to_params()
        mime = None
        if "format" in params:
            mime = FORMATS.get(params["format"])
            if mime is None:
                raise InvalidQuery(f"Unknown format {params['format']!r}: use one of {', '.join(FORMATS)}.")
        return ImageFilters(
            text=params.get("text"),
            uploader=params.get("by"),
            added_from=_parse_date(params.get("from"), "from"),
            added_to=_parse_date(params.get("to"), "to"),
            mime_type=mime,
        )


def _parse_date(value: str | None, which: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidQuery(f"The '{which}' date {value!r} is not a date like 2024-05-31.") from None


def _int(value: str | None, default: int, low: int, high: int) -> int:
    try:
        return min(high, max(low, int(value))) if value else default
    except ValueError:
        return default


def parse_options(params: Mapping[str, str], settings: Settings) -> QueryOptions:
    """Lenient: numbers out of range are clamped, unreadable ones fall back to the defaults;
    an unknown metric is left for the search to refuse with its own message."""
    min_text = params.get("min", "").strip()
    try:
        min_similarity = float(min_text) if min_text and min_text != ANY else None
    except ValueError:
        min_similarity = None
    return QueryOptions(
        k=_int(params.get("k"), min(settings.default_k, WEB_MAX_K), 1, WEB_MAX_K),
        page=_int(params.get("page"), 1, 1, 10_000),
        metric=params.get("metric", "").strip().lower() or settings.index_metric,
        min_similarity=min_similarity,
    )


def options_params(options: QueryOptions, settings: Settings) -> dict[str, str]:
    """The options that differ from the defaults, for an address."""
    out: dict[str, str] = {}
    if options.k != min(settings.default_k, WEB_MAX_K):
        out["k"] = str(options.k)
    if options.min_similarity is not None:
        out["min"] = f"{options.min_similarity:g}"
    if options.metric != settings.index_metric:
        out["metric"] = options.metric
    if options.page > 1:
        out["page"] = str(options.page)
    return out


def make_url(path: str, params: Mapping[str, str]) -> str:
    params = {key: value for key, value in params.items() if value}
    return f"{path}?{urlencode(params)}" if params else path


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Results:
    tiles: list[Tile]
    has_more: bool
    gallery_empty: bool  # no hits because the gallery holds no images at all
    metric: str = ""
    exact: bool = False
    extra: dict = field(default_factory=dict)


def _score(metric: str, similarity: float | None, distance: float) -> tuple[str, str]:
    if similarity is None:
        return format_score(distance), f"{metric.upper()} distance (lower is closer)"
    return format_score(similarity), f"similarity ({metric})"


def _results(page: SearchPage, session) -> Results:
    tiles = []
    for hit in page.hits:
        score, title = _score(page.metric, hit.similarity, hit.distance)
        if hit.text_match:
            # Hybrid search ranks by the fused score, so say why a lower similarity sits higher.
            title += "; ranked up: its name or description has your words"
        tiles.append(Tile(hit.id, hit.name, hit.description, hit.thumbnail_url, score, title, hit.text_match))
    empty = not tiles and page.offset == 0 and count_images(session) == 0
    return Results(tiles, page.has_more, empty, page.metric, page.exact)


def _search_options(options: QueryOptions, filters: FilterParams) -> dict:
    return {
        "k": options.k,
        "offset": options.offset,
        "metric": options.metric,
        "min_similarity": options.min_similarity,
        "filters": filters.to_filters(),
    }


def text_results(settings: Settings, query: str, options: QueryOptions, filters: FilterParams) -> Results:
    opts = _search_options(options, filters)
    with db.session_scope(settings) as session:
        return _results(search_text(session, get_embedder(settings), query, **opts), session)


def image_query(settings: Settings, data: bytes) -> tuple[list[float], str]:
    """An image query's vector (what the page keeps for paging: 2 KB, not the image) and a small
    preview of the image as a data: URL. The bytes are validated like an upload; nothing is stored."""
    vector, decoded = encode_query_image(get_embedder(settings), data)
    preview_bytes = make_thumbnail(decoded.rgb, PREVIEW_SIZE, "webp", decoded.icc_profile)
    preview = "data:image/webp;base64," + base64.b64encode(preview_bytes).decode()
    return [float(x) for x in vector], preview


def vector_results(settings: Settings, vector: list[float], options: QueryOptions, filters: FilterParams) -> Results:
    """Results for a remembered image query."""
    opts = _search_options(options, filters)
    with db.session_scope(settings) as session:
        return _results(search_by_vector(session, get_embedder(settings), vector, **opts), session)


def fetch_image(settings: Settings, url: str) -> bytes:
    """The bytes behind an image URL; raises FetchError with a reason fit to show."""
    url = url.strip()
    if not url:
        raise FetchError("Paste the address of an image, starting with http:// or https://.")
    data, _final_url = fetch_for_settings(url, settings)
    return data


def similar_results(settings: Settings, image_id: int, options: QueryOptions, filters: FilterParams) -> Results:
    """ "More like this" for a stored image; `extra` holds the source image's name and thumbnail."""
    opts = _search_options(options, filters)
    with db.session_scope(settings) as session:
        source = get_image(session, image_id)
        results = _results(search_similar(session, get_embedder(settings), image_id, **opts), session)
    results.extra.update(name=source.name, thumbnail_url=source.thumbnail_url)
    return results


@dataclass(frozen=True)
class BrowseResults:
    tiles: list[Tile]
    total: int
    has_more: bool
    gallery_empty: bool


def browse_results(settings: Settings, filters: FilterParams, sort: str, page: int) -> BrowseResults:
    if sort not in SORTS:
        raise InvalidQuery(f"Unknown order {sort!r}: use one of {', '.join(SORTS)}.")
    image_filters = filters.to_filters()
    with db.session_scope(settings) as session:
        result: BrowsePage = browse_images(
            session, image_filters, sort=sort, limit=BROWSE_PAGE_SIZE, offset=(page - 1) * BROWSE_PAGE_SIZE
        )
        empty = result.total == 0 and (filters.count == 0 or count_images(session) == 0)
    tiles = [Tile(r.id, r.name, r.description, r.thumbnail_url) for r in result.items]
    return BrowseResults(tiles, result.total, result.has_more, empty)


def uploaders(settings: Settings) -> list[str]:
    with db.session_scope(settings) as session:
        return uploader_names(session)


# --- one image -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageDetails:
    id: int
    name: str
    description: str
    original_url: str
    download_url: str
    thumbnail_url: str
    filename: str
    size: str
    format: str
    dimensions: str
    added: str
    uploader: str


def human_size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n / (1024 * 1024):.1f} MB"


def image_details(settings: Settings, image_id: int) -> ImageDetails:
    """Raises NotFoundError."""
    with db.session_scope(settings) as session:
        record = get_image(session, image_id)
        uploader = session.get(User, record.uploaded_by) if record.uploaded_by else None
        uploader_name = uploader.username if uploader else ""
    fmt = record.mime_type.split("/")[-1]
    return ImageDetails(
        id=record.id,
        name=record.name,
        description=record.description,
        original_url=record.original_url,
        download_url=record.original_url + "?download=1",
        thumbnail_url=record.thumbnail_url,
        filename=record.original_filename,
        size=human_size(record.byte_size),
        format=FORMAT_LABELS.get(fmt, fmt.upper()),
        dimensions=f"{record.width} × {record.height} px",
        added=record.created_at.strftime("%Y-%m-%d %H:%M") if record.created_at else "",
        uploader=uploader_name or "command line",
    )


# --- errors ----------------------------------------------------------------------------------

EXPECTED_ERRORS = (
    RejectedImage,
    FetchError,
    ModelUnavailableError,
    ModelMismatchError,
    InvalidQuery,
    NotFoundError,
)


def describe_error(exc: BaseException) -> str:
    """One sentence for the page. Expected errors carry their own message; anything else is
    logged with its traceback and summarised, never shown as a stack trace."""
    if isinstance(exc, RejectedImage):
        return f"That file cannot be used as a query image: {exc}"
    if isinstance(exc, FetchError):
        return f"The image could not be fetched: {exc}"
    if isinstance(exc, EXPECTED_ERRORS):
        return str(exc)
    log.exception("search page error", exc_info=exc)
    return f"Something went wrong on the server ({type(exc).__name__}); the details are in the server log."
