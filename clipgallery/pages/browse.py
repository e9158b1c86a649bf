"""Browse ("/browse"): every image without a query, newest first (or oldest, or by name), narrowed
by the shared filters. The address holds the order, the filters and the page."""

from __future__ import annotations

import asyncio

import reflex as rx

from clipgallery import webquery
from clipgallery.components.client import client_script
from clipgallery.components.filters import filter_fields, select_field
from clipgallery.components.layout import page_shell
from clipgallery.components.tiles import empty_gallery, error_callout, loading_grid, message_card, pager, tile_grid
from clipgallery.config import get_settings
from clipgallery.pages.filters import FilterState
from clipgallery.webquery import Tile

SORT_LABELS = {"newest": "Newest first", "oldest": "Oldest first", "name": "By name"}


class BrowseState(FilterState):
    sort: str = "newest"
    page: int = 1
    tiles: rx.Field[list[Tile]] = rx.field(default_factory=list)
    total: int = 0
    has_more: bool = False
    loading: bool = False
    error: str = ""
    gallery_empty: bool = False
    prev_href: str = ""
    next_href: str = ""

    @rx.event
    def set_sort(self, value: str):
        self.sort = value
        return rx.redirect(self._href(1))

    def _href(self, page: int) -> str:
        params = {**self._filter_params().to_params()}
        if self.sort != "newest":
            params["sort"] = self.sort
        if page > 1:
            params["page"] = str(page)
        return webquery.make_url("/browse", params)

    @rx.event
    async def load(self):
        params = self.router.url.query_parameters
        filters = self._read_filters(params)
        self.sort = params.get("sort", "newest")
        try:
            self.page = max(1, int(params.get("page", "1")))
        except ValueError:
            self.page = 1
        self.loading = True
        self.error = ""
        yield
        try:
            result = await asyncio.to_thread(webquery.browse_results, get_settings(), filters, self.sort, self.page)
        except Exception as exc:
            self.error = webquery.describe_error(exc)
            self.tiles = []
            self.total = 0
            self.has_more = False
        else:
            self.tiles = result.tiles
            self.total = result.total
            self.has_more = result.has_more
            self.gallery_empty = result.gallery_empty
            self.prev_href = self._href(self.page - 1) if self.page > 1 else ""
            self.next_href = self._href(self.page + 1) if result.has_more else ""
        finally:
            self.loading = False
        yield
        await self._load_uploaders()

    @rx.event
    def apply(self, form_data: dict):
        return rx.redirect(self._href(1))

    @rx.event
    def clear(self):
        self._clear_filter_fields()
        return rx.redirect(self._href(1))


def browse_filters() -> rx.Component:
    return rx.card(
        rx.form(
            rx.vstack(
                filter_fields(),
                rx.hstack(
                    rx.button(rx.icon("filter", size=16), "Apply filters", type="submit"),
                    rx.button("Clear", type="button", variant="ghost", on_click=BrowseState.clear),
                    spacing="3",
                ),
                spacing="3",
                width="100%",
            ),
            on_submit=BrowseState.apply,
            aria_label="Filter images",
        ),
        width="100%",
    )


def browse() -> rx.Component:
    return page_shell(
        client_script(),
        rx.vstack(
            rx.flex(
                rx.vstack(
                    rx.heading("Browse", size="7", as_="h1"),
                    rx.text(
                        rx.cond(BrowseState.loading, "Loading…", f"{BrowseState.total} images"),
                        size="2",
                        color_scheme="gray",
                        data_testid="browse-total",
                    ),
                    spacing="1",
                ),
                rx.spacer(),
                rx.box(
                    select_field(
                        "Order", "browse-sort", BrowseState.sort, BrowseState.set_sort, list(SORT_LABELS.items())
                    ),
                    width="12em",
                ),
                direction="row",
                align="end",
                spacing="3",
                width="100%",
                wrap="wrap",
            ),
            browse_filters(),
            rx.cond(
                BrowseState.loading,
                loading_grid(),
                rx.cond(
                    BrowseState.error != "",
                    error_callout(BrowseState.error),
                    rx.cond(
                        BrowseState.tiles.length() > 0,
                        rx.vstack(
                            tile_grid(BrowseState.tiles, show_score=False, testid="browse-grid"),
                            pager(BrowseState.page, BrowseState.has_more, BrowseState.prev_href, BrowseState.next_href),
                            width="100%",
                            spacing="0",
                        ),
                        rx.cond(
                            BrowseState.gallery_empty,
                            empty_gallery(),
                            message_card(
                                "filter-x",
                                "No images match these filters",
                                rx.text("Loosen or clear the filters to see more.", color_scheme="gray"),
                                rx.button("Clear filters", variant="soft", on_click=BrowseState.clear),
                                testid="no-match",
                            ),
                        ),
                    ),
                ),
            ),
            spacing="5",
            width="100%",
        ),
    )
