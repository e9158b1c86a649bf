"""Search: the home page ("/"), results ("/search?q=...") and "more like this" ("/similar/<id>").

Text, image-URL and "more like this" queries live in the address: the page reads it in on_load
and runs the query, so reload, back/forward and shared links all work. An uploaded or pasted
image cannot be put in an address: its results are shown at /search, its vector is kept on the
server for paging (`_query_vector`, this browser tab only), and the best hit's "more like this"
link is offered as the shareable follow-up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import reflex as rx

from clipgallery import webquery
from clipgallery.components.client import IMAGE_QUERY_ID, client_script
from clipgallery.components.filters import filter_fields, select_field
from clipgallery.components.layout import page_shell
from clipgallery.components.tiles import empty_gallery, error_callout, loading_grid, no_match, pager, tile_grid
from clipgallery.config import get_settings
from clipgallery.imaging import RejectedImage
from clipgallery.pages.filters import FilterState
from clipgallery.webquery import ANY, FilterParams, QueryOptions, Tile

log = logging.getLogger(__name__)


class SearchState(FilterState):
    # The form: what the user is typing and choosing.
    q: str = ""
    url_input: str = ""
    k: str = "20"
    min_sim: str = ANY
    metric: str = "cosine"
    show_options: bool = False

    # The results on screen: small fields only (ids, names, URLs, formatted scores).
    mode: str = ""  # "" (nothing asked yet), "text", "url", "image" or "similar"
    tiles: rx.Field[list[Tile]] = rx.field(default_factory=list)
    page: int = 1
    has_more: bool = False
    loading: bool = False
    error: str = ""
    gallery_empty: bool = False
    query_label: str = ""  # the words, the URL or the file name the results are for
    preview: str = ""  # small data: URL of an image query
    source_id: int = 0  # "more like this": the image the results are like
    source_name: str = ""
    source_thumbnail: str = ""
    prev_href: str = ""
    next_href: str = ""

    # Gallery status for the home page.
    image_count: int = -1
    database_ok: bool = False
    model_ok: bool = False
    model_detail: str = ""

    # Backend only: an uploaded image query, remembered for paging as its vector (2 KB), never
    # as the image.
    _query_vector: list[float] = rx.field(default_factory=list)

    # --- computed ------------------------------------------------------------------------

    @rx.var
    def best_id(self) -> int:
        return self.tiles[0].id if self.tiles else 0

    @rx.var
    def searched(self) -> bool:
        return self.mode != "" and not self.loading and self.error == ""

    @rx.var
    def best_similar_href(self) -> str:
        return f"/similar/{self.tiles[0].id}" if self.tiles else ""

    # --- form setters --------------------------------------------------------------------

    @rx.event
    def set_q(self, value: str):
        self.q = value

    @rx.event
    def set_url_input(self, value: str):
        self.url_input = value

    @rx.event
    def set_k(self, value: str):
        self.k = value

    @rx.event
    def set_min_sim(self, value: str):
        self.min_sim = value

    @rx.event
    def set_metric(self, value: str):
        self.metric = value

    @rx.event
    def toggle_options(self):
        self.show_options = not self.show_options

    @rx.event
    def reset_options(self):
        settings = get_settings()
        self.k = str(min(settings.default_k, webquery.WEB_MAX_K))
        self.min_sim = ANY
        self.metric = settings.index_metric
        self._clear_filter_fields()

    # --- helpers -------------------------------------------------------------------------

    def _options(self, page: int = 1) -> QueryOptions:
        base = webquery.parse_options({"k": self.k, "min": self.min_sim, "metric": self.metric}, get_settings())
        return dataclasses.replace(base, page=page)

    def _read_options(self, params) -> QueryOptions:
        settings = get_settings()
        options = webquery.parse_options(params, settings)
        self.k = str(options.k)
        self.min_sim = ANY if options.min_similarity is None else f"{options.min_similarity:g}"
        self.metric = options.metric
        self.page = options.page
        if self.k not in webquery.K_CHOICES or self.min_sim not in webquery.MIN_SIMILARITY_CHOICES:
            self.show_options = True  # an unusual value from a link: let the user see it
        return options

    def _params(self, page: int) -> dict[str, str]:
        settings = get_settings()
        return {**webquery.options_params(self._options(page), settings), **self._filter_params().to_params()}

    def _href(self, page: int) -> str:
        if self.mode == "text":
            return webquery.make_url("/search", {"q": self.query_label, **self._params(page)})
        if self.mode == "url":
            return webquery.make_url("/search", {"url": self.query_label, **self._params(page)})
        if self.mode == "similar":
            return webquery.make_url(f"/similar/{self.source_id}", self._params(page))
        return ""

    def _start(self, mode: str, label: str) -> None:
        self.mode = mode
        self.query_label = label
        self.loading = True
        self.error = ""
        self.tiles = []
        self.has_more = False
        self.gallery_empty = False

    def _show(self, results: webquery.Results) -> None:
        self.tiles = results.tiles
        self.has_more = results.has_more
        self.gallery_empty = results.gallery_empty
        self.prev_href = self._href(self.page - 1) if self.page > 1 else ""
        self.next_href = self._href(self.page + 1) if results.has_more else ""

    def _fail(self, exc: BaseException) -> None:
        self.error = webquery.describe_error(exc)
        self.tiles = []
        self.has_more = False

    async def _run(self, fn, *args) -> None:
        """Run one service call in a worker thread and show its results or its error."""
        try:
            results = await asyncio.to_thread(fn, get_settings(), *args)
        except Exception as exc:
            self._fail(exc)
        else:
            self._show(results)
        finally:
            self.loading = False

    # --- page loads ----------------------------------------------------------------------

    @rx.event
    async def load_home(self):
        """on_load of "/": a fresh form and the gallery's status."""
        from clipgallery.gallery import gallery_status

        self.mode = ""
        self.q = ""
        self.error = ""
        self.tiles = []
        settings = get_settings()
        try:
            status = await asyncio.to_thread(gallery_status, settings)
        except Exception:
            log.exception("gallery status failed")
            self.database_ok = self.model_ok = False
            self.model_detail = "The gallery status could not be read."
            return
        self.image_count = status.image_count
        self.database_ok = status.database_ok
        self.model_ok = status.model_ok
        self.model_detail = status.model_detail
        await self._load_uploaders()

    @rx.event
    async def load_search(self):
        """on_load of /search: run what the address asks for."""
        params = self.router.url.query_parameters
        words = params.get("q", "").strip()
        url = params.get("url", "").strip()
        if not words and not url:
            if self.mode == "image":
                return  # the results of an uploaded image (running or shown)
            self.mode = ""
            self.tiles = []
            self.error = ""
            return
        options = self._read_options(params)
        filters = self._read_filters(params)  # active filters show as a count on the options button
        self.q = words
        self.url_input = url
        self._start("text" if words else "url", words or url)
        self.preview = ""
        yield
        if words:
            await self._run(webquery.text_results, words, options, filters)
        else:
            await self._run_url(url, options, filters)
        yield
        await self._load_uploaders()

    async def _run_url(self, url: str, options: QueryOptions, filters: FilterParams) -> None:
        settings = get_settings()
        try:
            data = await asyncio.to_thread(webquery.fetch_image, settings, url)
            vector, self.preview = await asyncio.to_thread(webquery.image_query, settings, data)
            results = await asyncio.to_thread(webquery.vector_results, settings, vector, options, filters)
        except Exception as exc:
            self._fail(exc)
        else:
            self._show(results)
        finally:
            self.loading = False

    @rx.event
    async def load_similar(self):
        """on_load of /similar/<id>: "more like this" for a stored image."""
        params = self.router.url.query_parameters
        raw_id = self.router.url.path.rstrip("/").rsplit("/", 1)[-1]
        options = self._read_options(params)
        filters = self._read_filters(params)
        self.q = ""
        self.source_id = int(raw_id) if raw_id.isdigit() else 0
        self.source_name = ""
        self.source_thumbnail = ""
        self._start("similar", "")
        yield
        if not self.source_id:
            self._fail(webquery.NotFoundError(f"There is no image {raw_id!r}."))
            self.loading = False
            return
        try:
            results = await asyncio.to_thread(
                webquery.similar_results, get_settings(), self.source_id, options, filters
            )
        except Exception as exc:
            self._fail(exc)
        else:
            self._show(results)
            self.source_name = results.extra.get("name", "")
            self.source_thumbnail = results.extra.get("thumbnail_url", "")
        finally:
            self.loading = False
        yield
        await self._load_uploaders()

    # --- actions ---------------------------------------------------------------------------

    @rx.event
    def submit_text(self, form_data: dict):
        words = self.q.strip()
        if not words:
            self.error = "Type what you are looking for, or give an image."
            return None
        self.mode = "text"
        self.query_label = words
        return rx.redirect(self._href(1))

    @rx.event
    def submit_url(self, form_data: dict):
        url = self.url_input.strip()
        if not url:
            self.mode = "url"
            self.error = "Paste the address of an image, starting with http:// or https://."
            return None
        self.mode = "url"
        self.query_label = url
        return rx.redirect(self._href(1))

    @rx.event
    def apply_options(self, form_data: dict | None = None):
        """Re-run the current query with the options and filters as they are now set."""
        if self.mode == "image":
            return SearchState.image_page(1)
        if self.mode in ("text", "url", "similar"):
            return rx.redirect(self._href(1))
        if self.q.strip():
            return SearchState.submit_text({})
        return None

    @rx.event
    async def search_upload(self, files: list[rx.UploadFile]):
        """An image picked, dropped or pasted: search by it (nothing is stored)."""
        if not files:
            return
        upload = files[0]
        limit = get_settings().max_upload_bytes
        data = await upload.read(limit + 1)  # never more than the limit in memory
        self._query_vector = []
        self.page = 1
        self.q = ""
        self._start("image", upload.name or "your image")
        self.preview = ""
        if self.router.url.path != "/search" or self.router.url.query:
            yield rx.redirect("/search")  # an address that does not claim to be another query
        else:
            yield
        try:
            if len(data) > limit:
                raise RejectedImage(f"The file is larger than the limit of {limit / 1024 / 1024:.0f} MB.", "too_large")
            self._query_vector, self.preview = await asyncio.to_thread(webquery.image_query, get_settings(), data)
        except Exception as exc:
            self._fail(exc)
            self.loading = False
            return
        await self._run_image()

    @rx.event
    async def image_page(self, page: int):
        if not self._query_vector:
            self.mode = "image"
            self.error = "The image is no longer on the server: give it again to search."
            return
        self.page = max(1, page)
        self._start("image", self.query_label)
        yield
        await self._run_image()

    async def _run_image(self) -> None:
        try:
            results = await asyncio.to_thread(
                webquery.vector_results,
                get_settings(),
                self._query_vector,
                self._options(self.page),
                self._filter_params(),
            )
        except Exception as exc:
            self._fail(exc)
            self._query_vector = []
        else:
            self._show(results)
        finally:
            self.loading = False


# --- components ----------------------------------------------------------------------------

METRIC_LABELS = {"cosine": "Cosine", "l2": "Euclidean (L2)", "ip": "Inner product", "l1": "Manhattan (L1)"}


def query_form(big: bool) -> rx.Component:
    return rx.form(
        rx.hstack(
            rx.input(
                rx.input.slot(rx.icon("search", size=20 if big else 16)),
                id="q",
                name="q",
                type="search",
                value=SearchState.q,
                on_change=SearchState.set_q,
                placeholder="Describe a picture, e.g. a dog on a beach",
                aria_label="Search words",
                size="3",
                auto_focus=big,
                flex="1",
                min_width="0",
                radius="full" if big else "large",
                style={"font-size": "var(--font-size-4)"} if big else {},
            ),
            rx.button("Search", type="submit", size="3", radius="full" if big else "large"),
            spacing="2",
            width="100%",
        ),
        on_submit=SearchState.submit_text,
        role="search",
        aria_label="Search by words",
        width="100%",
    )


def image_drop_zone() -> rx.Component:
    return rx.box(
        rx.upload.root(
            rx.hstack(
                rx.icon("image-up", size=20, color=rx.color("accent", 11), flex_shrink="0"),
                rx.vstack(
                    rx.text("Search by image", size="2", weight="medium"),
                    rx.text("Drop, paste (Ctrl+V) or click to choose", size="1", color_scheme="gray"),
                    spacing="0",
                    align="start",
                ),
                align="center",
                spacing="3",
            ),
            id=IMAGE_QUERY_ID,
            multiple=False,
            max_files=1,
            on_drop=SearchState.search_upload(rx.upload_files(upload_id=IMAGE_QUERY_ID)),
            aria_label="Search by image: drop, paste or choose an image file",
            border="1px dashed var(--gray-a8)",
            border_radius="var(--radius-4)",
            padding="0.6em 1em",
            cursor="pointer",
            height="100%",
            display="flex",
            align_items="center",
            background="var(--gray-a2)",
            drag_active_style={"background": "var(--accent-a4)", "border_color": "var(--accent-9)"},
            _hover={"background": "var(--accent-a3)"},
            _focus_visible={"outline": "3px solid var(--accent-9)", "outline_offset": "2px"},
        ),
        id=IMAGE_QUERY_ID,
        data_testid="image-drop-zone",
        flex_shrink="0",
    )


def url_form() -> rx.Component:
    return rx.form(
        rx.hstack(
            rx.input(
                rx.input.slot(rx.icon("link", size=16)),
                id="image-url",
                name="url",
                inputmode="url",
                value=SearchState.url_input,
                on_change=SearchState.set_url_input,
                placeholder="…or an image address: https://…",
                aria_label="Image URL",
                size="2",
                flex="1",
                min_width="0",
            ),
            rx.button(rx.icon("arrow-right", size=16), "Search by URL", type="submit", variant="soft", size="2"),
            spacing="2",
            width="100%",
            align="center",
            height="100%",
        ),
        on_submit=SearchState.submit_url,
        aria_label="Search by image URL",
        flex="1",
        min_width="0",
        width="100%",
    )


def options_toggle() -> rx.Component:
    return rx.button(
        rx.icon("sliders-horizontal", size=16),
        "Options & filters",
        rx.cond(
            SearchState.filter_count > 0,
            rx.badge(SearchState.filter_count, radius="full", variant="solid", data_testid="filter-count"),
        ),
        rx.icon(rx.cond(SearchState.show_options, "chevron-up", "chevron-down"), size=14),
        variant="ghost",
        size="2",
        type="button",
        on_click=SearchState.toggle_options,
        aria_expanded=SearchState.show_options,
        aria_controls="search-options",
        flex_shrink="0",
    )


def options_panel() -> rx.Component:
    return rx.cond(
        SearchState.show_options,
        rx.card(
            rx.form(
                rx.vstack(
                    rx.grid(
                        select_field(
                            "Results per page",
                            "opt-k",
                            SearchState.k,
                            SearchState.set_k,
                            [(k, k) for k in webquery.K_CHOICES],
                        ),
                        select_field(
                            "Minimum similarity",
                            "opt-min",
                            SearchState.min_sim,
                            SearchState.set_min_sim,
                            [(m, "No minimum" if m == ANY else m) for m in webquery.MIN_SIMILARITY_CHOICES],
                        ),
                        select_field(
                            "Metric",
                            "opt-metric",
                            SearchState.metric,
                            SearchState.set_metric,
                            list(METRIC_LABELS.items()),
                        ),
                        columns={"initial": "1", "xs": "3"},
                        spacing="3",
                        width="100%",
                    ),
                    rx.separator(size="4"),
                    filter_fields(),
                    rx.hstack(
                        rx.button("Apply", type="submit"),
                        rx.button("Reset", type="button", variant="ghost", on_click=SearchState.reset_options),
                        spacing="3",
                    ),
                    spacing="4",
                    width="100%",
                ),
                on_submit=SearchState.apply_options,
                aria_label="Search options and filters",
            ),
            id="search-options",
            width="100%",
        ),
    )


def search_panel(big: bool = False) -> rx.Component:
    return rx.vstack(
        query_form(big),
        rx.flex(
            image_drop_zone(),
            url_form(),
            direction={"initial": "column", "sm": "row"},
            spacing="3",
            width="100%",
            align="stretch",
        ),
        rx.hstack(options_toggle(), justify="end" if not big else "center", width="100%"),
        options_panel(),
        spacing="3",
        width="100%",
    )


def status_line() -> rx.Component:
    return rx.vstack(
        rx.hstack(
            rx.cond(
                SearchState.image_count >= 0,
                rx.text(
                    rx.text.strong(SearchState.image_count, data_testid="image-count"),
                    " images",
                    size="2",
                    color_scheme="gray",
                ),
            ),
            rx.cond(
                SearchState.database_ok,
                rx.badge("Database ready", color_scheme="green", variant="soft", data_testid="database-status"),
                rx.badge("Database unavailable", color_scheme="red", variant="soft", data_testid="database-status"),
            ),
            rx.cond(
                SearchState.model_ok,
                rx.badge("Model ready", color_scheme="green", variant="soft", data_testid="model-status"),
                rx.badge("Model not ready", color_scheme="amber", variant="soft", data_testid="model-status"),
            ),
            spacing="3",
            align="center",
            justify="center",
            wrap="wrap",
        ),
        rx.cond(
            ~SearchState.model_ok & (SearchState.model_detail != ""),
            rx.text(SearchState.model_detail, size="1", color_scheme="gray", align="center", max_width="40em"),
        ),
        align="center",
        spacing="2",
        width="100%",
        data_testid="status-card",
    )


def _preview(src) -> rx.Component:
    return rx.image(
        src=src,
        alt="The query image",
        width="72px",
        height="72px",
        object_fit="cover",
        border_radius="var(--radius-3)",
        flex_shrink="0",
        data_testid="query-preview",
    )


def results_header() -> rx.Component:
    return rx.box(
        rx.match(
            SearchState.mode,
            (
                "text",
                rx.heading("Results for “", SearchState.query_label, "”", size="5", as_="h1", trim="both"),
            ),
            (
                "url",
                rx.hstack(
                    rx.cond(SearchState.preview != "", _preview(SearchState.preview)),
                    rx.vstack(
                        rx.heading("Results for the image at", size="5", as_="h1"),
                        rx.text(
                            SearchState.query_label, size="2", color_scheme="gray", style={"word-break": "break-all"}
                        ),
                        spacing="1",
                        min_width="0",
                    ),
                    align="center",
                    spacing="3",
                ),
            ),
            (
                "image",
                rx.hstack(
                    rx.cond(SearchState.preview != "", _preview(SearchState.preview)),
                    rx.vstack(
                        rx.heading("Results for your image", size="5", as_="h1"),
                        rx.text(SearchState.query_label, size="2", color_scheme="gray"),
                        rx.cond(
                            SearchState.best_id > 0,
                            rx.text(
                                "An uploaded image has no address of its own; to share these results, share ",
                                rx.link("more like the best match", href=SearchState.best_similar_href),
                                ".",
                                size="1",
                                color_scheme="gray",
                            ),
                        ),
                        spacing="1",
                        min_width="0",
                    ),
                    align="center",
                    spacing="3",
                ),
            ),
            (
                "similar",
                rx.hstack(
                    rx.cond(SearchState.source_thumbnail != "", _preview(SearchState.source_thumbnail)),
                    rx.vstack(
                        rx.heading("More like “", SearchState.source_name, "”", size="5", as_="h1"),
                        rx.link("View the image", href=f"/image/{SearchState.source_id}", size="2"),
                        spacing="1",
                    ),
                    align="center",
                    spacing="3",
                ),
            ),
            rx.fragment(),
        ),
        data_testid="results-header",
        width="100%",
    )


def image_pager() -> rx.Component:
    return rx.hstack(
        rx.button(
            rx.icon("chevron-left", size=16),
            "Previous",
            variant="soft",
            disabled=SearchState.page <= 1,
            on_click=SearchState.image_page(SearchState.page - 1),
        ),
        rx.text("Page ", SearchState.page, size="2", color_scheme="gray", data_testid="page-number"),
        rx.button(
            "Next",
            rx.icon("chevron-right", size=16),
            variant="soft",
            disabled=~SearchState.has_more,
            on_click=SearchState.image_page(SearchState.page + 1),
        ),
        justify="center",
        align="center",
        spacing="4",
        width="100%",
        padding_top="1.5em",
    )


def results_body() -> rx.Component:
    return rx.cond(
        SearchState.loading,
        loading_grid(),
        rx.cond(
            SearchState.error != "",
            error_callout(SearchState.error),
            rx.cond(
                SearchState.tiles.length() > 0,
                rx.vstack(
                    tile_grid(SearchState.tiles),
                    rx.cond(
                        SearchState.mode == "image",
                        image_pager(),
                        pager(SearchState.page, SearchState.has_more, SearchState.prev_href, SearchState.next_href),
                    ),
                    width="100%",
                    spacing="0",
                ),
                rx.cond(
                    SearchState.mode != "",
                    rx.cond(SearchState.gallery_empty, empty_gallery(), no_match()),
                    rx.text(
                        "Type a few words, or give an image, to search the gallery.",
                        color_scheme="gray",
                        data_testid="search-prompt",
                    ),
                ),
            ),
        ),
    )


def home() -> rx.Component:
    """ "/": the search box first, everything else tucked away."""
    return page_shell(
        client_script(),
        rx.vstack(
            rx.vstack(
                rx.heading("Find any picture by describing it", size={"initial": "7", "sm": "8"}, align="center"),
                rx.text(
                    "Search your gallery with words, with a similar image, or with an image address.",
                    size="3",
                    color_scheme="gray",
                    align="center",
                ),
                align="center",
                spacing="3",
            ),
            search_panel(big=True),
            rx.cond(SearchState.error != "", error_callout(SearchState.error)),
            status_line(),
            spacing="6",
            width="100%",
            max_width="52em",
            margin_x="auto",
            padding_top={"initial": "4vh", "sm": "10vh"},
            align="center",
        ),
    )


def results() -> rx.Component:
    """ "/search" and "/similar/<id>": the editable query above the results."""
    return page_shell(
        client_script(),
        rx.vstack(
            rx.box(search_panel(), width="100%", max_width="60em"),
            rx.separator(size="4"),
            results_header(),
            results_body(),
            spacing="5",
            width="100%",
        ),
    )
