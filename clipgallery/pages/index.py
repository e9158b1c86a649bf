"""Landing page: what clipgallery is and whether the gallery is ready."""

from __future__ import annotations

import asyncio

import reflex as rx

from clipgallery.config import get_settings


class IndexState(rx.State):
    """Gallery status shown on the landing page, read on every page load."""

    loading: bool = True
    image_count: int = 0
    database_ok: bool = False
    database_detail: str = ""
    model_ok: bool = False
    model_detail: str = ""

    @rx.event
    async def load_status(self):
        from clipgallery.gallery import gallery_status

        self.loading = True
        yield
        try:
            # gallery_status talks to the database and may load the model: keep the event loop free.
            status = await asyncio.to_thread(gallery_status, get_settings())
        except Exception as exc:  # a bad setting, say: show it rather than a spinner forever
            self.database_ok = self.model_ok = False
            self.database_detail = self.model_detail = f"{type(exc).__name__}: {exc}"
            self.loading = False
            return
        self.image_count = status.image_count
        self.database_ok = status.database_ok
        self.database_detail = status.database_detail
        self.model_ok = status.model_ok
        self.model_detail = status.model_detail
        self.loading = False


def _status_row(label: str, ok: rx.Var[bool], detail: rx.Var[str], testid: str) -> rx.Component:
    return rx.hstack(
        rx.text(label, weight="medium", width="6em", flex_shrink="0"),
        rx.cond(
            ok,
            rx.badge("ready", color_scheme="green", variant="soft"),
            rx.badge("not ready", color_scheme="red", variant="soft"),
        ),
        rx.text(detail, size="2", color_scheme="gray", trim="both"),
        align="center",
        spacing="3",
        data_testid=testid,
    )


def status_card() -> rx.Component:
    return rx.card(
        rx.skeleton(
            rx.vstack(
                rx.hstack(
                    rx.heading(IndexState.image_count, size="8", data_testid="image-count"),
                    rx.text("images indexed", size="3", color_scheme="gray"),
                    align="baseline",
                    spacing="2",
                ),
                rx.separator(size="4"),
                _status_row("Database", IndexState.database_ok, IndexState.database_detail, "database-status"),
                _status_row("Model", IndexState.model_ok, IndexState.model_detail, "model-status"),
                spacing="3",
                width="100%",
            ),
            loading=IndexState.loading,
        ),
        size="3",
        width="100%",
        data_testid="status-card",
    )


def index() -> rx.Component:
    return rx.container(
        rx.vstack(
            rx.hstack(
                rx.icon("images", size=32, color=rx.color("accent", 9)),
                rx.heading("clipgallery", size="8"),
                align="center",
                spacing="3",
            ),
            rx.text(
                "Search your own photos by describing them, or by showing a similar picture.",
                size="4",
                color_scheme="gray",
            ),
            status_card(),
            spacing="5",
            padding_y="12vh",
            width="100%",
        ),
        size="2",
    )
