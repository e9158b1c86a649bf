"""HTTP API served next to the Reflex app (mounted through `rx.App(api_transformer=...)`)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from clipgallery.config import get_settings

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
