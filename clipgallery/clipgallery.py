"""The Reflex app: pages, the routes under /api and /files, and the model preload at start-up."""

import asyncio
import logging

import reflex as rx

from clipgallery.api import api
from clipgallery.config import get_settings
from clipgallery.pages import index

log = logging.getLogger(__name__)

app = rx.App(api_transformer=api)
app.add_page(index.index, route="/", title="clipgallery", on_load=index.IndexState.load_status)


@app.register_lifespan_task
async def preload_model() -> None:
    """Load the model while the server already answers, so the first search need not wait
    (and a model that cannot load is reported at once, in the log and by /api/health)."""
    settings = get_settings()
    if not settings.model_preload:
        return
    from clipgallery.embedding import get_embedder

    ok, detail = await asyncio.to_thread(get_embedder(settings).status)
    (log.info if ok else log.warning)("model preload: %s", detail)
