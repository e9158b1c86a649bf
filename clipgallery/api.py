"""The JSON API and the stored files, served by the Reflex backend (`rx.App(api_transformer=api)`).

Routes are thin: they parse input, call one service function and shape the answer. Every error
has one form, `{"error": {"status", "code", "message"}}`, with the status code that fits.
Interactive documentation: /api/docs (OpenAPI schema at /api/openapi.json).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from clipgallery.config import Settings, get_settings

log = logging.getLogger(__name__)

SESSION_COOKIE = "clipgallery_session"
# Files are named by their content hash: a URL never changes its bytes.
IMMUTABLE = "public, max-age=31536000, immutable"
Metric = Literal["cosine", "l2", "ip", "l1"]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _error_body(status: int, code: str, message: str) -> dict:
    return {"error": {"status": status, "code": code, "message": message}}


api = FastAPI(
    title="clipgallery API",
    version="1",
    description="CLIP image search over PostgreSQL + pgvector. Similarity = 1 − cosine distance.",
    docs_url="/api/docs",
    redoc_url=None,
    openapi_url="/api/openapi.json",
)


class BodyLimit:
    """Refuse request bodies over the upload limit before they are parsed (413), whether the
    client announces the size (Content-Length) or streams it; multipart parsing would otherwise
    spool any size to disk first."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The largest legitimate body: one image at the limit plus the multipart envelope.
        limit = get_settings().max_upload_bytes + 64 * 1024
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(send, limit)
            return
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, counted_receive, send)
        except _BodyTooLarge:
            await _too_large(send, limit)


class _BodyTooLarge(StarletteHTTPException):
    # An HTTPException, because FastAPI turns any other error while reading a body into a 400.
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request is larger than {limit} bytes.")


async def _too_large(send, limit: int) -> None:
    body = json.dumps(_error_body(413, "request_too_large", f"The request is larger than {limit} bytes.")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


api.add_middleware(BodyLimit)


@api.exception_handler(ApiError)
async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(_error_body(exc.status, exc.code, exc.message), exc.status, headers=exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {
        401: "unauthorized",
        403: "forbidden",
        404: "not_found",
        405: "method_not_allowed",
        413: "request_too_large",
    }.get(exc.status_code, "error")
    return JSONResponse(_error_body(exc.status_code, code, str(exc.detail)), exc.status_code, headers=exc.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in error.get('loc', ()) if p not in ('query', 'body'))}: {error.get('msg')}"
        for error in exc.errors()
    )
    return JSONResponse(_error_body(422, "invalid_request", problems or "Invalid request."), 422)


@contextmanager
def translate_errors() -> Iterator[None]:
    """Service errors → API errors with the status code that fits."""
    from clipgallery.auth import AuthError, LockedOut, PermissionDenied
    from clipgallery.db import DatabaseError
    from clipgallery.embedding import ModelUnavailableError
    from clipgallery.fetch import FetchError
    from clipgallery.gallery import ModelMismatchError, NotFoundError
    from clipgallery.imaging import RejectedImage
    from clipgallery.search import InvalidQuery

    try:
        yield
    except ApiError:
        raise
    except InvalidQuery as exc:
        raise ApiError(400, "invalid_query", str(exc)) from None
    except NotFoundError as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    except RejectedImage as exc:
        raise _rejection(exc.kind, str(exc)) from None
    except FetchError as exc:
        raise ApiError(exc.status, "fetch_failed", str(exc)) from None
    except LockedOut as exc:
        raise ApiError(429, "locked_out", str(exc), {"Retry-After": str(exc.retry_after)}) from None
    except AuthError as exc:
        raise ApiError(401, "unauthorized", str(exc), {"WWW-Authenticate": "Bearer"}) from None
    except PermissionDenied as exc:
        raise ApiError(403, "forbidden", str(exc)) from None
    except (ModelUnavailableError, ModelMismatchError) as exc:
        raise ApiError(503, "model_unavailable", str(exc)) from None
    except DatabaseError as exc:
        raise ApiError(503, "database_unavailable", str(exc)) from None


def _rejection(kind: str, message: str) -> ApiError:
    status = {"too_large": 413, "unsupported": 415}.get(kind, 400)
    return ApiError(status, f"image_{kind or 'rejected'}", message)


# --- dependencies ----------------------------------------------------------------------------


def settings_dep() -> Settings:
    return get_settings()


@contextmanager
def _session(settings: Settings):
    from clipgallery import db

    with db.session_scope(settings) as session:
        yield session


def _bearer(authorization: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def current_user(request: Request, authorization: str | None, settings: Settings):
    """The user behind a Bearer token or the web app's session cookie, or None."""
    from clipgallery import auth

    with translate_errors(), _session(settings) as session:
        token = _bearer(authorization)
        if token:
            user = auth.token_user(session, token)
            if user is None:
                raise ApiError(401, "unauthorized", "Unknown or expired API token.", {"WWW-Authenticate": "Bearer"})
            return user
        return auth.session_user(session, request.cookies.get(SESSION_COOKIE))


def reader(
    request: Request,
    settings: Annotated[Settings, Depends(settings_dep)],
    authorization: Annotated[str | None, Header()] = None,
) -> Settings:
    """Searching: open to all unless the gallery is private."""
    if settings.private_gallery and current_user(request, authorization, settings) is None:
        raise ApiError(401, "unauthorized", "This gallery is private: log in or send an API token.")
    return settings


def admin(
    request: Request,
    settings: Annotated[Settings, Depends(settings_dep)],
    authorization: Annotated[str | None, Header()] = None,
):
    """Changing the gallery: an admin's API token (or web session)."""
    user = current_user(request, authorization, settings)
    if user is None:
        raise ApiError(
            401,
            "unauthorized",
            "Send an admin's API token: Authorization: Bearer <token>.",
            {"WWW-Authenticate": "Bearer"},
        )
    if not user.is_admin:
        raise ApiError(403, "forbidden", "This needs an administrator.")
    return settings, user


# --- models ----------------------------------------------------------------------------------


class Hit(BaseModel):
    id: int
    name: str
    description: str
    distance: float
    similarity: float | None = Field(description="1 − cosine distance (None for L1)")
    thumbnail_url: str
    original_url: str
    page_url: str
    width: int
    height: int
    mime_type: str
    score: float | None = Field(
        default=None, description="hybrid search: the reciprocal-rank-fusion score results are ordered by"
    )
    text_match: bool = Field(default=False, description="hybrid search: the name or description matched the words")


class SearchResult(BaseModel):
    metric: str
    exact: bool = Field(description="True: exact sequential scan; False: HNSW index")
    hybrid: bool = Field(default=False, description="True: vector ranking fused with full-text search")
    k: int
    offset: int
    has_more: bool
    next_offset: int | None
    results: list[Hit]


class ImageOut(BaseModel):
    id: int
    name: str
    description: str
    original_filename: str
    mime_type: str
    width: int
    height: int
    byte_size: int
    sha256: str
    uploaded_by: int | None
    created_at: str | None
    updated_at: str | None
    has_embedding: bool
    original_url: str
    thumbnail_url: str
    page_url: str


class ImageUpdate(BaseModel):
    name: str | None = Field(default=None, max_length=500)
    description: str | None = Field(default=None, max_length=10_000)


class UrlQuery(BaseModel):
    url: str = Field(max_length=2048)
    k: int = 20
    offset: int = 0
    min_similarity: float | None = None
    metric: Metric | None = None


class IngestResult(BaseModel):
    status: Literal["added", "duplicate"]
    image: ImageOut


def _hit(hit) -> Hit:
    return Hit(**{**hit.__dict__, "page_url": f"/image/{hit.id}"})


def _page(page) -> SearchResult:
    return SearchResult(
        metric=page.metric,
        exact=page.exact,
        hybrid=page.hybrid,
        k=page.k,
        offset=page.offset,
        has_more=page.has_more,
        next_offset=page.offset + page.k if page.has_more else None,
        results=[_hit(h) for h in page.hits],
    )


def _image(record) -> ImageOut:
    return ImageOut(
        **{
            key: getattr(record, key)
            for key in ("id", "name", "description", "original_filename", "mime_type", "width", "height")
        },
        byte_size=record.byte_size,
        sha256=record.sha256,
        uploaded_by=record.uploaded_by,
        created_at=record.created_at.isoformat() if record.created_at else None,
        updated_at=record.updated_at.isoformat() if record.updated_at else None,
        has_embedding=record.has_embedding,
        original_url=record.original_url,
        thumbnail_url=record.thumbnail_url,
        page_url=f"/image/{record.id}",
    )


class SearchOptions:
    """Query parameters shared by every search route."""

    def __init__(
        self,
        k: Annotated[int, Query(ge=1, le=500, description="results per page")] = 20,
        offset: Annotated[int, Query(ge=0, le=10_000)] = 0,
        min_similarity: Annotated[float | None, Query(ge=-1, le=1)] = None,
        metric: Metric | None = None,
        text: Annotated[str | None, Query(max_length=200, description="words in name or description")] = None,
        uploader: Annotated[str | None, Query(max_length=64)] = None,
        format: Annotated[str | None, Query(max_length=32, description="e.g. image/png")] = None,
        added_from: date | None = None,
        added_to: date | None = None,
    ) -> None:
        from clipgallery.gallery import ImageFilters

        self.options = dict(k=k, offset=offset, min_similarity=min_similarity, metric=metric)
        self.options["filters"] = ImageFilters(text, uploader, added_from, added_to, format)


def _embedder(settings: Settings):
    from clipgallery.embedding import get_embedder

    return get_embedder(settings)


async def _read_upload(upload: UploadFile, settings: Settings) -> bytes:
    """At most max_upload_bytes; a larger upload is refused without reading it all."""
    data = await upload.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise _rejection("too_large", f"The file is larger than the limit of {settings.max_upload_bytes} bytes.")
    return data


# --- routes: search --------------------------------------------------------------------------


@api.get("/api/search", response_model=SearchResult, tags=["search"])
def search_by_text(
    q: Annotated[str, Query(min_length=1, max_length=1000, description="what to look for")],
    options: Annotated[SearchOptions, Depends()],
    settings: Annotated[Settings, Depends(reader)],
    hybrid: Annotated[
        bool | None,
        Query(description="fuse with full-text search over names and descriptions (default: the server's setting)"),
    ] = None,
) -> SearchResult:
    """Images matching words: by default the vector ranking fused with full-text search over names
    and descriptions (hybrid); `hybrid=false` for the vector ranking alone."""
    from clipgallery.search import search_text

    with translate_errors(), _session(settings) as session:
        return _page(search_text(session, _embedder(settings), q, hybrid=hybrid, **options.options))


@api.post("/api/search/image", response_model=SearchResult, tags=["search"])
async def search_by_image(
    file: Annotated[UploadFile, File(description="JPEG, PNG, WebP or GIF")],
    options: Annotated[SearchOptions, Depends()],
    settings: Annotated[Settings, Depends(reader)],
) -> SearchResult:
    """Images similar to an uploaded image (nothing is stored)."""
    from starlette.concurrency import run_in_threadpool

    from clipgallery.search import search_image_bytes

    data = await _read_upload(file, settings)

    def run() -> SearchResult:
        with translate_errors(), _session(settings) as session:
            return _page(search_image_bytes(session, _embedder(settings), data, **options.options))

    return await run_in_threadpool(run)


@api.post("/api/search/url", response_model=SearchResult, tags=["search"])
def search_by_url(query: UrlQuery, settings: Annotated[Settings, Depends(reader)]) -> SearchResult:
    """Images similar to the image at a public http(s) URL (fetched safely: no private addresses)."""
    from clipgallery.fetch import fetch_for_settings
    from clipgallery.search import search_image_bytes

    with translate_errors():
        data, _final_url = fetch_for_settings(query.url, settings)
        with _session(settings) as session:
            page = search_image_bytes(
                session,
                _embedder(settings),
                data,
                k=query.k,
                offset=query.offset,
                min_similarity=query.min_similarity,
                metric=query.metric,
            )
    return _page(page)


# --- routes: images --------------------------------------------------------------------------


@api.get("/api/images/{image_id}", response_model=ImageOut, tags=["images"])
def image_details(image_id: int, settings: Annotated[Settings, Depends(reader)]) -> ImageOut:
    from clipgallery.gallery import get_image

    with translate_errors(), _session(settings) as session:
        return _image(get_image(session, image_id))


@api.get("/api/images/{image_id}/similar", response_model=SearchResult, tags=["search"])
def similar_images(
    image_id: int, options: Annotated[SearchOptions, Depends()], settings: Annotated[Settings, Depends(reader)]
) -> SearchResult:
    """ "More like this": the nearest images to a stored image, itself left out."""
    from clipgallery.search import search_similar

    with translate_errors(), _session(settings) as session:
        return _page(search_similar(session, _embedder(settings), image_id, **options.options))


@api.post("/api/images", response_model=IngestResult, status_code=201, tags=["admin"])
async def add_image(
    file: Annotated[UploadFile, File(description="JPEG, PNG, WebP or GIF")],
    caller: Annotated[tuple, Depends(admin)],
    name: Annotated[str | None, Form(max_length=500)] = None,
    description: Annotated[str | None, Form(max_length=10_000)] = None,
) -> JSONResponse:
    """Add an image (admin). 201 when added, 200 with the existing image for a duplicate."""
    from starlette.concurrency import run_in_threadpool

    from clipgallery.gallery import get_image
    from clipgallery.ingest import ingest_image
    from clipgallery.storage import Storage

    settings, user = caller
    data = await _read_upload(file, settings)

    def run() -> JSONResponse:
        with translate_errors(), _session(settings) as session:
            outcome = ingest_image(
                session,
                _embedder(settings),
                Storage(settings.upload_dir),
                data,
                file.filename,
                name,
                description,
                user.id,
            )
            if outcome.status == "rejected":
                raise _rejection(outcome.kind, outcome.reason)
            body = IngestResult(status=outcome.status, image=_image(get_image(session, outcome.image_id)))
        return JSONResponse(body.model_dump(), status_code=201 if outcome.status == "added" else 200)

    return await run_in_threadpool(run)


@api.patch("/api/images/{image_id}", response_model=ImageOut, tags=["admin"])
def edit_image(image_id: int, change: ImageUpdate, caller: Annotated[tuple, Depends(admin)]) -> ImageOut:
    from clipgallery.gallery import update_image

    settings, _user = caller
    with translate_errors(), _session(settings) as session:
        try:
            return _image(update_image(session, image_id, change.name, change.description))
        except ValueError as exc:
            raise ApiError(400, "invalid_request", str(exc)) from None


@api.delete("/api/images/{image_id}", status_code=204, tags=["admin"])
def remove_image(image_id: int, caller: Annotated[tuple, Depends(admin)]) -> None:
    from clipgallery.gallery import delete_images
    from clipgallery.storage import Storage

    settings, _user = caller
    with translate_errors(), _session(settings) as session:
        if delete_images(session, Storage(settings.upload_dir), [image_id]) == 0:
            raise ApiError(404, "not_found", f"No image with id {image_id}.")


class DuplicateImageOut(BaseModel):
    id: int
    name: str
    distance: float = Field(
        description="cosine distance to the group's keeper (for the keeper itself: to its closest copy)"
    )
    similarity: float
    width: int
    height: int
    byte_size: int
    mime_type: str
    created_at: str | None
    thumbnail_url: str
    original_url: str
    page_url: str
    keep: bool = Field(description="the suggested image to keep: most pixels, then the oldest")


class DuplicateGroupOut(BaseModel):
    distance: float = Field(description="cosine distance of the group's farthest image from the keeper")
    similarity: float = Field(description="1 - distance: every image is at least this similar to the keeper")
    closest_distance: float = Field(description="cosine distance of the keeper's closest copy")
    keep: int
    images: list[DuplicateImageOut]


class DuplicatesResult(BaseModel):
    max_distance: float
    min_similarity: float
    groups: list[DuplicateGroupOut]


@api.get("/api/admin/duplicates", response_model=DuplicatesResult, tags=["admin"])
def near_duplicates(
    caller: Annotated[tuple, Depends(admin)],
    max_distance: Annotated[float | None, Query(ge=0, le=1, description="cosine distance (1 - similarity)")] = None,
    limit: Annotated[int | None, Query(ge=1, le=10_000, description="at most this many groups")] = None,
) -> DuplicatesResult:
    """Groups of near-duplicate images (admin), tightest first, each with a suggested keeper."""
    from clipgallery.duplicates import find_near_duplicate_groups, stored_model_id

    settings, _user = caller
    threshold = settings.duplicate_distance if max_distance is None else max_distance
    with translate_errors(), _session(settings) as session:
        groups = find_near_duplicate_groups(
            session, settings, stored_model_id(session, settings), threshold, limit_groups=limit
        )
    return DuplicatesResult(
        max_distance=threshold,
        min_similarity=1.0 - threshold,
        groups=[
            DuplicateGroupOut(
                distance=group.distance,
                similarity=group.similarity,
                closest_distance=group.closest_distance,
                keep=group.keep_id,
                images=[
                    DuplicateImageOut(
                        **{k: getattr(image, k) for k in ("id", "name", "distance", "similarity", "width", "height")},
                        byte_size=image.byte_size,
                        mime_type=image.mime_type,
                        created_at=image.created_at.isoformat() if image.created_at else None,
                        thumbnail_url=image.thumbnail_url,
                        original_url=image.original_url,
                        page_url=f"/image/{image.id}",
                        keep=image.id == group.keep_id,
                    )
                    for image in group.images
                ],
            )
            for group in groups
        ],
    )


# --- routes: health and files ----------------------------------------------------------------


@api.get("/api/health", tags=["health"])
def health() -> JSONResponse:
    """Database, model and gallery state; 200 while the database works, 503 otherwise.

    Always answers: a failure anywhere becomes `ok: false` with the reason in `detail`.
    """
    try:
        from clipgallery.gallery import gallery_status

        status = gallery_status(get_settings())
        body = {
            "database": {"ok": bool(status.database_ok), "detail": str(status.database_detail)},
            "model": {"ok": bool(status.model_ok), "detail": str(status.model_detail)},
            "images": int(status.image_count),
            "vector_index": str(status.vector_index),
        }
    except Exception as exc:
        detail = f"health check failed: {type(exc).__name__}: {exc}"
        body = {"database": {"ok": False, "detail": detail}, "model": {"ok": False, "detail": detail}, "images": 0}
    return JSONResponse(body, status_code=200 if body["database"]["ok"] else 503)


@api.get("/files/{relpath:path}", include_in_schema=False)
def stored_file(relpath: str, request: Request, download: bool = False) -> FileResponse:
    """An original or a thumbnail. `?download=1` sends the original under its uploaded file name."""
    from sqlalchemy import text

    from clipgallery import auth
    from clipgallery.storage import ORIGINALS, THUMBS, Storage

    settings = get_settings()
    if not relpath.startswith((f"{ORIGINALS}/", f"{THUMBS}/")) or "/." in relpath:
        raise ApiError(404, "not_found", "No such file.")
    if settings.private_gallery:
        with _session(settings) as session:
            if auth.session_user(session, request.cookies.get(SESSION_COOKIE)) is None:
                raise ApiError(401, "unauthorized", "This gallery is private: please log in.")
    try:
        path = Storage(settings.upload_dir).path(relpath)
    except ValueError:
        raise ApiError(404, "not_found", "No such file.") from None
    if not path.is_file():
        raise ApiError(404, "not_found", "No such file.")
    headers = {
        "Cache-Control": "private, max-age=3600" if settings.private_gallery else IMMUTABLE,
        "X-Content-Type-Options": "nosniff",
    }
    filename = None
    if download:
        with _session(settings) as session:
            filename = session.execute(
                text("SELECT original_filename FROM images WHERE stored_path = :p"), {"p": relpath}
            ).scalar()
    return FileResponse(
        path, headers=headers, filename=filename, content_disposition_type="attachment" if download else "inline"
    )
