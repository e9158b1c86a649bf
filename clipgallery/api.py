"""HTTP routes served next to the Reflex app (mounted through `rx.App(api_transformer=...)`):
health, and the stored files (originals and thumbnails)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse

from clipgallery.config import get_settings

log = logging.getLogger(__name__)

SESSION_COOKIE = "clipgallery_session"
# Files are named by their content hash: a URL never changes its bytes.
IMMUTABLE = "public, max-age=31536000, immutable"


api = FastAPI(title="clipgallery API", docs_url=None, redoc_url=None, openapi_url=None)


@api.get("/api/health")
def health() -> JSONResponse:
    """Database, model and gallery state; 200 while the database works, 503 otherwise.

    Always answers: a failure anywhere becomes `ok: false` with the reason in `detail`.
    """
    try:
        # Imported here so that a broken core module still gives a health answer.
        from clipgallery.gallery import gallery_status

        status = gallery_status(get_settings())
        body = {
            "database": {"ok": bool(status.database_ok), "detail": str(status.database_detail)},
            "model": {"ok": bool(status.model_ok), "detail": str(status.model_detail)},
            "images": int(status.image_count),
        }
    except Exception as exc:
        detail = f"health check failed: {type(exc).__name__}: {exc}"
        body = {
            "database": {"ok": False, "detail": detail},
            "model": {"ok": False, "detail": detail},
            "images": 0,
        }
    return JSONResponse(body, status_code=200 if body["database"]["ok"] else 503)


@api.get("/files/{relpath:path}")
def stored_file(relpath: str, request: Request, download: bool = False) -> FileResponse:
    """An original or a thumbnail. `?download=1` sends the original under its uploaded file name."""
    from clipgallery import auth, db
    from clipgallery.storage import ORIGINALS, THUMBS, Storage

    settings = get_settings()
    if not relpath.startswith((f"{ORIGINALS}/", f"{THUMBS}/")) or "/." in relpath:
        raise HTTPException(404, "No such file.")
    if settings.private_gallery:
        with db.session_scope(settings) as session:
            if auth.session_user(session, request.cookies.get(SESSION_COOKIE)) is None:
                raise HTTPException(401, "This gallery is private: please log in.")
    try:
        path = Storage(settings.upload_dir).path(relpath)
    except ValueError:
        raise HTTPException(404, "No such file.") from None
    if not path.is_file():
        raise HTTPException(404, "No such file.")
    headers = {
        "Cache-Control": "private, max-age=3600" if settings.private_gallery else IMMUTABLE,
        "X-Content-Type-Options": "nosniff",
    }
    filename = None
    if download:
        from sqlalchemy import text

        with db.session_scope(settings) as session:
            filename = session.execute(
                text("SELECT original_filename FROM images WHERE stored_path = :p"), {"p": relpath}
            ).scalar()
    return FileResponse(
        path,
        headers=headers,
        filename=filename,
        content_disposition_type="attachment" if download else "inline",
    )
