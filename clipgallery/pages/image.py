"""One image ("/image/<id>"): the full picture, its metadata, a download of the original and
"more like this" (its neighbours by its own stored vector, itself left out)."""

from __future__ import annotations

import asyncio
import logging

import reflex as rx

from clipgallery import webquery
from clipgallery.components.client import client_script
from clipgallery.components.layout import page_shell
from clipgallery.components.tiles import error_callout, message_card, tile_grid
from clipgallery.config import get_settings
from clipgallery.webquery import FilterParams, QueryOptions, Tile

log = logging.getLogger(__name__)

SIMILAR_COUNT = 12


class ImageState(rx.State):
    image_id: int = 0
    loading: bool = True
    error: str = ""
    name: str = ""
    description: str = ""
    original_url: str = ""
    download_url: str = ""
    filename: str = ""
    size: str = ""
    format: str = ""
    dimensions: str = ""
    added: str = ""
    uploader: str = ""
    similar: rx.Field[list[Tile]] = rx.field(default_factory=list)
    similar_has_more: bool = False
    similar_error: str = ""

    @rx.event
    async def load(self):
        raw_id = self.router.url.path.rstrip("/").rsplit("/", 1)[-1]
        self.image_id = int(raw_id) if raw_id.isdigit() else 0
        self.loading = True
        self.error = ""
        self.similar = []
        self.similar_error = ""
        yield
        settings = get_settings()
        try:
            if not self.image_id:
                raise webquery.NotFoundError(f"There is no image {raw_id!r}.")
            details = await asyncio.to_thread(webquery.image_details, settings, self.image_id)
        except Exception as exc:
            self.error = webquery.describe_error(exc)
            self.loading = False
            return
        for key in ("name", "description", "original_url", "download_url", "filename", "size", "format"):
            setattr(self, key, getattr(details, key))
        self.dimensions = details.dimensions
        self.added = details.added
        self.uploader = details.uploader
        self.loading = False
        yield
        options = QueryOptions(k=SIMILAR_COUNT, page=1, metric=settings.index_metric, min_similarity=None)
        try:
            results = await asyncio.to_thread(
                webquery.similar_results, settings, self.image_id, options, FilterParams()
            )
        except Exception as exc:
            self.similar_error = webquery.describe_error(exc)
        else:
            self.similar = results.tiles
            self.similar_has_more = results.has_more


def meta_row(label: str, value: rx.Var, testid: str) -> rx.Component:
    return rx.data_list.item(
        rx.data_list.label(label, min_width="7em"),
        rx.data_list.value(value, data_testid=testid, style={"word-break": "break-word"}),
    )


def details_panel() -> rx.Component:
    return rx.vstack(
        rx.heading(ImageState.name, size="7", as_="h1", data_testid="image-name"),
        rx.cond(
            ImageState.description != "",
            rx.text(ImageState.description, size="3", data_testid="image-description"),
            rx.text("No description.", size="2", color_scheme="gray"),
        ),
        rx.data_list.root(
            meta_row("File", ImageState.filename, "meta-filename"),
            meta_row("Format", ImageState.format, "meta-format"),
            meta_row("Dimensions", ImageState.dimensions, "meta-dimensions"),
            meta_row("Size", ImageState.size, "meta-size"),
            meta_row("Added", ImageState.added, "meta-added"),
            meta_row("Uploaded by", ImageState.uploader, "meta-uploader"),
            size="2",
            orientation={"initial": "vertical", "xs": "horizontal"},
        ),
        rx.flex(
            rx.button(
                rx.el.a(
                    rx.icon("download", size=16),
                    "Download original",
                    href=ImageState.download_url,
                    download=ImageState.filename,
                    data_testid="download-link",
                ),
                as_child=True,
                size="3",
            ),
            rx.button(
                rx.el.a(rx.icon("external-link", size=16), "Open full size", href=ImageState.original_url),
                as_child=True,
                size="3",
                variant="soft",
            ),
            rx.link(
                rx.button(rx.icon("sparkles", size=16), "More like this", size="3", variant="soft"),
                href=f"/similar/{ImageState.image_id}",
            ),
            spacing="3",
            wrap="wrap",
        ),
        spacing="4",
        width="100%",
        min_width="0",
    )


def similar_section() -> rx.Component:
    return rx.vstack(
        rx.hstack(
            rx.heading("More like this", size="5", as_="h2"),
            rx.spacer(),
            rx.cond(
                ImageState.similar_has_more,
                rx.link("See more", href=f"/similar/{ImageState.image_id}", size="2", weight="medium"),
            ),
            width="100%",
            align="baseline",
        ),
        rx.cond(
            ImageState.similar_error != "",
            error_callout(ImageState.similar_error),
            rx.cond(
                ImageState.similar.length() > 0,
                tile_grid(ImageState.similar, testid="similar-grid"),
                rx.text("No other images yet.", color_scheme="gray"),
            ),
        ),
        spacing="4",
        width="100%",
        as_="section",
        aria_label="More like this",
    )


def image_page() -> rx.Component:
    return page_shell(
        client_script(),
        rx.cond(
            ImageState.error != "",
            message_card(
                "image-off",
                "Image not found",
                rx.text(ImageState.error, color_scheme="gray"),
                rx.link("Browse all images", href="/browse"),
                testid="image-error",
            ),
            rx.skeleton(
                rx.vstack(
                    rx.grid(
                        rx.box(
                            rx.el.a(
                                rx.image(
                                    src=ImageState.original_url,
                                    alt=ImageState.name,
                                    width="100%",
                                    max_height="78vh",
                                    object_fit="contain",
                                    data_testid="full-image",
                                ),
                                href=ImageState.original_url,
                                aria_label="Open the full-size image",
                            ),
                            background="var(--gray-a3)",
                            border_radius="var(--radius-4)",
                            overflow="hidden",
                            display="flex",
                            justify_content="center",
                        ),
                        details_panel(),
                        columns={"initial": "1", "md": "minmax(0, 3fr) minmax(18em, 2fr)"},
                        spacing="6",
                        width="100%",
                        align="start",
                    ),
                    rx.separator(size="4"),
                    similar_section(),
                    spacing="6",
                    width="100%",
                ),
                loading=ImageState.loading,
            ),
        ),
    )
