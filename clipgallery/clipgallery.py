"""The Reflex app: pages, the routes under /api and /files, and the model preload at start-up."""

import asyncio
import logging

import reflex as rx

from clipgallery.api import api
from clipgallery.config import get_settings
from clipgallery.pages import (
    admin_common,
    admin_duplicates,
    admin_jobs,
    admin_manage,
    admin_upload,
    admin_users,
    browse,
    image,
    login,
    search,
)
from clipgallery.pages.session import SessionState

log = logging.getLogger(__name__)

app = rx.App(api_transformer=api)
# Searchers' pages: every page first refreshes the session (and enforces a private gallery).
app.add_page(search.home, route="/", title="clipgallery", on_load=[SessionState.refresh, search.SearchState.load_home])
app.add_page(
    search.results,
    route="/search",
    title="Search · clipgallery",
    on_load=[SessionState.refresh, search.SearchState.load_search],
)
app.add_page(
    search.results,
    route="/similar/[id]",
    title="More like this · clipgallery",
    on_load=[SessionState.refresh, search.SearchState.load_similar],
)
app.add_page(
    browse.browse,
    route="/browse",
    title="Browse · clipgallery",
    on_load=[SessionState.refresh, browse.BrowseState.load],
)
app.add_page(
    image.image_page,
    route="/image/[id]",
    title="Image · clipgallery",
    on_load=[SessionState.refresh, image.ImageState.load],
)


# Login and the admin pages. Every admin page loads through admin_on_load (session refresh, then
# the server-side admin check); every admin event handler checks again on its own.
app.add_page(login.login, route="/login", title="Log in · clipgallery", on_load=SessionState.refresh)
app.add_page(
    admin_upload.admin_upload, route="/admin", title="Add images · clipgallery", on_load=admin_common.admin_on_load()
)
app.add_page(
    admin_manage.admin_manage,
    route="/admin/manage",
    title="Manage images · clipgallery",
    on_load=admin_common.admin_on_load(admin_manage.ManageState.load),
)
app.add_page(
    admin_jobs.admin_jobs,
    route="/admin/jobs",
    title="Index & re-embed · clipgallery",
    on_load=admin_common.admin_on_load(),
)
app.add_page(
    admin_duplicates.admin_duplicates,
    route="/admin/duplicates",
    title="Near-duplicates · clipgallery",
    on_load=admin_common.admin_on_load(admin_duplicates.DuplicatesState.load),
)
app.add_page(
    admin_users.admin_users,
    route="/admin/users",
    title="Users · clipgallery",
    on_load=admin_common.admin_on_load(admin_users.UsersState.load),
)


@app.register_lifespan_task
async def preload_model() -> None:
    """Load the model while the server already answers, so the first search need not wait
    (and a model that cannot load is reported at once, in the log and by /api/health)."""
    settings = get_settings()
    if not settings.model_preload:
        return
    from clipgallery.embedding import get_embedder

    embedder = get_embedder(settings)
    ok, detail = await asyncio.to_thread(embedder.status)
    (log.info if ok else log.warning)("model preload: %s", detail)
    if ok:  # text queries are served from here on; image queries once this is done
        try:
            await asyncio.to_thread(embedder.load_image_tower)
        except Exception as exc:  # the first image query will try again and report it
            log.warning("preparing the image tower failed: %s", exc)
