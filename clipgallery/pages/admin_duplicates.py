"""/admin/duplicates: groups of near-duplicate images, with a suggested keeper, and deleting.

The scan (clipgallery.duplicates) compares every image with its nearest neighbours through the
HNSW index; on a large gallery it takes a while, so it runs as a background event that shows
its progress. The found groups stay on the server (a backend variable); the page holds only the
rows it shows. Deleting an image rebuilds the affected group from its remaining links, without
a new scan. Every handler checks the administrator first.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field

import reflex as rx

from clipgallery import db, duplicates, gallery
from clipgallery.config import get_settings
from clipgallery.pages.admin_common import (
    AdminState,
    DeleteImagesMixin,
    Refused,
    admin_frame,
    check_admin_token,
    delete_dialog,
    field_label,
    human_bytes,
)
from clipgallery.search import InvalidQuery

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
SHOWN_GROUPS = 50  # groups on the page at a time (the next ones move up as groups are resolved)


@dataclass
class DuplicateImageRow:
    id: str
    name: str
    thumb: str
    href: str
    details: str
    similarity: str
    keep: bool


@dataclass
class DuplicateGroupRow:
    key: str
    title: str
    images: list[DuplicateImageRow] = field(default_factory=list)
    others: list[str] = field(default_factory=list)  # ids of every image but the suggested keeper


def _image_row(image: duplicates.DuplicateImage, keep: bool) -> DuplicateImageRow:
    return DuplicateImageRow(
        id=str(image.id),
        name=image.name,
        thumb=image.thumbnail_url,
        href=f"/image/{image.id}",
        details=(
            f"#{image.id} · {image.width}×{image.height} · {human_bytes(image.byte_size)}"
            + (f" · added {image.created_at:%Y-%m-%d}" if image.created_at else "")
        ),
        similarity=f"{image.similarity:.4f}",
        keep=keep,
    )


def _group_row(group: duplicates.DuplicateGroup) -> DuplicateGroupRow:
    return DuplicateGroupRow(
        key="-".join(str(i) for i in group.ids),
        title=f"{len(group.images)} images · similarity ≥ {group.similarity:.4f}",
        images=[_image_row(image, image.id == group.keep_id) for image in group.images],
        others=[str(i) for i in group.ids if i != group.keep_id],
    )


class ScanProgress:
    """Written by the worker thread, read by the event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.done = 0
        self.total = 0

    def update(self, done: int, total: int) -> None:
        with self._lock:
            self.done, self.total = done, total

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.done, self.total


def _scan(max_distance: float, progress: ScanProgress) -> list[duplicates.DuplicateGroup]:
    settings = get_settings()
    with db.session_scope(settings) as session:
        model_id = duplicates.stored_model_id(session, settings)
        return duplicates.find_near_duplicate_groups(
            session, settings, model_id, max_distance, progress=progress.update
        )


def _without_images(found: list[duplicates.DuplicateGroup], image_ids: list[int]) -> list[duplicates.DuplicateGroup]:
    with db.session_scope(get_settings()) as session:
        return duplicates.without_images(session, found, image_ids)


def _parse_similarity(raw: object) -> float:
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise InvalidQuery("Enter the minimum similarity as a number, e.g. 0.95.") from None
    if not 0.0 <= value <= 1.0:
        raise InvalidQuery("The minimum similarity must be between 0 and 1.")
    return value


class DuplicatesState(DeleteImagesMixin, AdminState):
    # The threshold in force, as typed; it starts at the configured one.
    min_similarity: str = f"{1.0 - get_settings().duplicate_distance:.3f}"
    shown_similarity: str = ""  # the threshold of the groups shown
    groups: rx.Field[list[DuplicateGroupRow]] = rx.field(default_factory=list)
    group_count: int = 0
    image_count: int = 0
    scanning: bool = False
    scanned: bool = False
    done: int = 0
    total: int = 0
    seconds: str = ""
    error: str = ""

    # Every group found (server side only): the page shows the first SHOWN_GROUPS of them.
    _found: list[duplicates.DuplicateGroup] = rx.field(default_factory=list)

    @rx.var
    def percent(self) -> int:
        return round(100 * self.done / self.total) if self.total else 0

    @rx.var
    def summary(self) -> str:
        if not self.scanned:
            return ""
        if self.group_count == 0:
            return f"No near-duplicates at similarity ≥ {self.shown_similarity} ({self.seconds} s)."
        shown = f", the first {SHOWN_GROUPS} shown" if self.group_count > SHOWN_GROUPS else ""
        groups = f"{self.group_count} group{'s' if self.group_count != 1 else ''}"
        return (
            f"{groups} of near-duplicates ({self.image_count} images{shown}) at similarity ≥ {self.shown_similarity}"
            f" ({self.seconds} s)."
        )

    def _show(self, found: list[duplicates.DuplicateGroup]) -> None:
        self._found = found
        self.group_count = len(found)
        self.image_count = sum(len(group.images) for group in found)
        self.groups = [_group_row(group) for group in found[:SHOWN_GROUPS]]

    # --- handlers: each checks the administrator before it reads or changes anything ---------------

    @rx.event
    async def load(self):
        try:
            await self._require_admin()
        except Refused as refused:
            return self._refusal(refused)
        return DuplicatesState.scan

    @rx.event
    async def apply_threshold(self, form: dict):
        try:
            await self._require_admin()
        except Refused as refused:
            return self._refusal(refused)
        try:
            value = _parse_similarity(form.get("min_similarity"))
        except InvalidQuery as exc:
            self.error = str(exc)
            return None
        self.min_similarity = f"{value:g}"
        return DuplicatesState.scan

    @rx.event(background=True)
    async def scan(self):
        """Scan at the threshold in force; a threshold given during a scan gets its own scan next."""
        async with self:
            if self.scanning:
                return None
            token, raw = self.session_token, self.min_similarity
            self.scanning = True
        again = False
        try:
            await check_admin_token(token)
        except Refused as refused:
            async with self:
                self.scanning = False
                return self._refusal(refused)
        progress = ScanProgress()
        async with self:
            self.error, self.done, self.total = "", 0, 0
        try:
            max_distance = duplicates.similarity_to_distance(_parse_similarity(raw))
            task = asyncio.ensure_future(asyncio.to_thread(_scan, max_distance, progress))
            started = asyncio.get_running_loop().time()
            while not task.done():
                await asyncio.wait({task}, timeout=POLL_SECONDS)
                done, total = progress.snapshot()
                async with self:
                    self.done, self.total = done, total
            found = task.result()
            async with self:
                self._show(found)
                self.seconds = f"{asyncio.get_running_loop().time() - started:.1f}"
                self.scanned, self.shown_similarity = True, raw
                again = self.min_similarity != raw  # a new threshold arrived during the scan
        except (InvalidQuery, gallery.ModelMismatchError) as exc:
            async with self:
                self.error = str(exc)
        except Exception as exc:
            log.exception("near-duplicate scan failed")
            async with self:
                self.error = f"The scan failed: {type(exc).__name__}: {exc}"
        finally:
            async with self:
                self.scanning = False
        return DuplicatesState.scan if again else None

    async def _after_delete(self, image_ids: list[int]) -> None:
        self._show(await asyncio.to_thread(_without_images, self._found, image_ids))


# --- page ------------------------------------------------------------------------------------------


def threshold_form() -> rx.Component:
    return rx.form(
        rx.hstack(
            rx.vstack(
                field_label("Minimum similarity", "dup-similarity"),
                rx.input(
                    id="dup-similarity",
                    name="min_similarity",
                    type="number",
                    min="0",
                    max="1",
                    step="0.001",
                    default_value=DuplicatesState.min_similarity,
                    width="10em",
                ),
                spacing="1",
            ),
            rx.button(
                rx.icon("scan-search", size=16),
                "Find duplicates",
                type="submit",
                loading=DuplicatesState.scanning,
                data_testid="find-duplicates",
            ),
            align="end",
            spacing="3",
            wrap="wrap",
        ),
        rx.text(
            "Images at least this similar (1 − cosine distance) count as near copies. 1 is identical; "
            "re-encoded or resized copies usually score above 0.95 with a pretrained model.",
            size="1",
            color_scheme="gray",
            margin_top="0.5em",
        ),
        on_submit=DuplicatesState.apply_threshold,
        reset_on_submit=False,
        width="100%",
    )


def image_card(image: rx.Var[DuplicateImageRow]) -> rx.Component:
    return rx.card(
        rx.vstack(
            rx.link(
                rx.image(
                    src=image.thumb,
                    alt=image.name,
                    width="100%",
                    height="9em",
                    object_fit="cover",
                    border_radius="var(--radius-2)",
                    loading="lazy",
                    background=rx.color("gray", 3),
                ),
                href=image.href,
                width="100%",
            ),
            rx.text(image.name, weight="bold", size="2", class_name="rt-truncate", width="100%"),
            rx.text(image.details, size="1", color_scheme="gray"),
            rx.hstack(
                rx.badge("similarity " + image.similarity, color_scheme="gray", size="1", variant="soft"),
                rx.cond(
                    image.keep,
                    rx.badge(rx.icon("star", size=12), "Suggested keep", color_scheme="green", size="1"),
                ),
                rx.spacer(),
                rx.icon_button(
                    rx.icon("trash-2", size=14),
                    on_click=DuplicatesState.ask_delete([image.id]),
                    variant="soft",
                    color_scheme="red",
                    size="1",
                    aria_label="Delete " + image.name,
                    title="Delete",
                    disabled=DuplicatesState.busy,
                ),
                align="center",
                spacing="2",
                width="100%",
                wrap="wrap",
            ),
            spacing="2",
            width="100%",
        ),
        width="14em",
        flex_shrink="0",
        data_testid="duplicate-image",
        data_image_id=image.id,
        data_keep=rx.cond(image.keep, "true", "false"),
    )


def group_card(group: rx.Var[DuplicateGroupRow]) -> rx.Component:
    return rx.box(
        rx.vstack(
            rx.hstack(
                rx.heading(group.title, size="3", as_="h2"),
                rx.spacer(),
                rx.button(
                    rx.icon("trash-2", size=14),
                    "Keep suggested, delete others",
                    on_click=DuplicatesState.ask_delete(group.others),
                    variant="soft",
                    color_scheme="red",
                    size="1",
                    disabled=DuplicatesState.busy,
                ),
                align="center",
                width="100%",
                wrap="wrap",
            ),
            rx.hstack(rx.foreach(group.images, image_card), spacing="3", wrap="wrap", width="100%"),
            spacing="2",
            width="100%",
        ),
        border_bottom="1px solid var(--gray-a5)",
        padding_bottom="1em",
        width="100%",
        role="group",
        aria_label=group.title,
        data_testid="duplicate-group",
        data_group=group.key,
    )


def duplicates_panel() -> rx.Component:
    return rx.vstack(
        threshold_form(),
        rx.cond(
            DuplicatesState.error != "",
            rx.callout(DuplicatesState.error, icon="triangle_alert", color_scheme="red", role="alert", width="100%"),
        ),
        rx.cond(
            DuplicatesState.scanning,
            rx.vstack(
                rx.text(
                    "Comparing images: ",
                    DuplicatesState.done.to_string(),
                    " of ",
                    DuplicatesState.total.to_string(),
                    size="2",
                    color_scheme="gray",
                ),
                rx.progress(value=DuplicatesState.percent, max=100, width="100%"),
                spacing="1",
                width="100%",
                data_testid="duplicates-progress",
            ),
        ),
        rx.cond(
            DuplicatesState.summary != "",
            rx.text(DuplicatesState.summary, size="2", color_scheme="gray", data_testid="duplicates-summary"),
        ),
        rx.foreach(DuplicatesState.groups, group_card),
        delete_dialog(DuplicatesState),
        spacing="4",
        width="100%",
    )


def admin_duplicates() -> rx.Component:
    return admin_frame(
        "/admin/duplicates",
        "Near-duplicates",
        "Images that are near copies of each other (resized, re-compressed, lightly edited), by their vectors.",
        duplicates_panel(),
    )
