"""/admin/manage: find images, edit their name and description, delete or re-embed them.

The state holds one page of rows (ids, names, thumbnail URLs) and the selected ids, never the
whole gallery. Every handler that reads or changes images checks the administrator first.
"""

from __future__ import annotations

import asyncio
import logging

import reflex as rx

from clipgallery import db, gallery, ingest
from clipgallery.config import get_settings
from clipgallery.embedding import ModelUnavailableError, get_embedder
from clipgallery.pages.admin_common import (
    AdminState,
    DeleteImagesMixin,
    Refused,
    admin_frame,
    delete_dialog,
    field_label,
    human_bytes,
)
from clipgallery.storage import Storage

log = logging.getLogger(__name__)

PAGE_SIZE = 24
# Read by screen readers, not shown (the placeholder says the same to sighted users).
VISUALLY_HIDDEN = {
    "position": "absolute",
    "width": "1px",
    "height": "1px",
    "overflow": "hidden",
    "clip": "rect(0 0 0 0)",
    "white_space": "nowrap",
}


def _row(record: gallery.ImageRecord) -> dict[str, str]:
    return {
        "id": str(record.id),
        "name": record.name,
        "description": record.description,
        "thumb": record.thumbnail_url,
        "href": f"/image/{record.id}",
        "details": (
            f"#{record.id} · {record.mime_type.removeprefix('image/').upper()} · {record.width}×{record.height}"
            f" · {human_bytes(record.byte_size)}"
            + (f" · added {record.created_at:%Y-%m-%d}" if record.created_at else "")
        ),
        "embedded": "yes" if record.has_embedding else "no",
    }


def _browse(text: str, offset: int) -> gallery.BrowsePage:
    with db.session_scope(get_settings()) as session:
        return gallery.browse_images(
            session, gallery.ImageFilters(text=text or None), sort="newest", limit=PAGE_SIZE, offset=offset
        )


def _get(image_id: int) -> gallery.ImageRecord:
    with db.session_scope(get_settings()) as session:
        return gallery.get_image(session, image_id)


def _update(image_id: int, name: str, description: str) -> gallery.ImageRecord:
    with db.session_scope(get_settings()) as session:
        return gallery.update_image(session, image_id, name=name, description=description)


def _reembed(image_ids: list[int]) -> int:
    settings = get_settings()
    with db.session_scope(settings) as session:
        return ingest.reembed_images(
            session, get_embedder(settings), Storage(settings.upload_dir), image_ids=image_ids, progress=False
        )


class ManageState(DeleteImagesMixin, AdminState):
    query: str = ""  # the filter in force
    offset: int = 0
    total: int = 0
    rows: rx.Field[list[dict[str, str]]] = rx.field(default_factory=list)
    selected: rx.Field[list[str]] = rx.field(default_factory=list)  # image ids (as strings, like the rows)
    loading: bool = False
    error: str = ""

    edit_open: bool = False
    edit_id: str = ""
    edit_name: str = ""
    edit_description: str = ""
    edit_error: str = ""

    @rx.var
    def page_label(self) -> str:
        if self.total == 0:
            return "No images" if not self.query else "No images match"
        last = min(self.total, self.offset + len(self.rows))
        return f"{self.offset + 1}–{last} of {self.total} images"

    @rx.var
    def has_previous(self) -> bool:
        return self.offset > 0

    @rx.var
    def has_next(self) -> bool:
        return self.offset + len(self.rows) < self.total

    @rx.var
    def all_on_page_selected(self) -> bool:
        return bool(self.rows) and all(row["id"] in self.selected for row in self.rows)

    async def _load(self) -> None:
        self.loading = True
        try:
            page = await asyncio.to_thread(_browse, self.query, self.offset)
            if not page.items and self.offset > 0:  # the page emptied (deletes): step back
                self.offset = max(0, self.offset - PAGE_SIZE)
                page = await asyncio.to_thread(_browse, self.query, self.offset)
            self.rows = [_row(record) for record in page.items]
            self.total = page.total
            self.error = ""
        except Exception as exc:
            log.exception("listing images failed")
            self.rows, self.total = [], 0
            self.error = f"The images could not be listed: {exc}"
        finally:
            self.loading = False

    # --- handlers: each checks the administrator before it reads or changes anything ---------------

    @rx.event
    async def load(self):
        try:
            await self._require_admin()
        except Refused as refused:
            return self._refusal(refused)
        await self._load()
        return None

    @rx.event
    async def apply_filter(self, form: dict):
        try:
            await self._require_admin()
        except Refused as refused:
            return self._refusal(refused)
        self.query = str(form.get("query") or "").strip()[:200]
        self.offset = 0
        self.selected = []
        await self._load()
        return None

    @rx.event
    async def go_page(self, direction: int):
        try:
            await self._require_admin()
        except Refused as refused:
            return self._refusal(refused)
        self.offset = max(0, self.offset + (PAGE_SIZE if direction > 0 else -PAGE_SIZE))
        await self._load()
        return None

    @rx.event
    async def open_edit(self, image_id: str):
        try:
            await self._require_admin()
        except Refused as refused:
            return self._refusal(refused)
        try:
            record = await asyncio.to_thread(_get, int(image_id))
        except gallery.NotFoundError as exc:
            await self._load()
            return rx.toast.error(str(exc))
        self.edit_id = str(record.id)
        self.edit_name = record.name
        self.edit_description = record.description
        self.edit_error = ""
        self.edit_open = True
        return None

    @rx.event
    async def save_edit(self, form: dict):
        try:
            await self._require_admin()
        except Refused as refused:
            self.edit_open = False
            return self._refusal(refused)
        name = str(form.get("name") or "")
        description = str(form.get("description") or "")
        try:
            record = await asyncio.to_thread(_update, int(self.edit_id), name, description)
        except (ValueError, gallery.NotFoundError) as exc:
            self.edit_error = str(exc)
            return None
        self.edit_open = False
        await self._load()
        return rx.toast.success(f"Saved “{record.name}”.")

    async def _after_delete(self, image_ids: list[int]) -> None:
        self.selected = [i for i in self.selected if int(i) not in image_ids]
        await self._load()

    @rx.event
    async def reembed(self, image_ids: list[str]):
        try:
            await self._require_admin()
        except Refused as refused:
            return self._refusal(refused)
        ids = [int(i) for i in image_ids][: PAGE_SIZE * 10]
        if not ids:
            return None
        self.busy = True
        try:
            done = await asyncio.to_thread(_reembed, ids)
        except (ModelUnavailableError, gallery.ModelMismatchError) as exc:
            return rx.toast.error(str(exc))
        finally:
            self.busy = False
        await self._load()
        return rx.toast.success(f"Re-embedded {done} image{'s' if done != 1 else ''}.")

    # Pure UI handlers: they change only this tab's own selection and dialogs.
    @rx.event
    def toggle(self, image_id: str, checked: bool):
        if checked and image_id not in self.selected:
            self.selected.append(image_id)
        elif not checked and image_id in self.selected:
            self.selected.remove(image_id)

    @rx.event
    def toggle_page(self, checked: bool):
        page_ids = [row["id"] for row in self.rows]
        if checked:
            self.selected = list(dict.fromkeys([*self.selected, *page_ids]))
        else:
            self.selected = [i for i in self.selected if i not in page_ids]

    @rx.event
    def clear_selection(self):
        self.selected = []

    @rx.event
    def set_edit_open(self, value: bool):
        self.edit_open = value


# --- page ------------------------------------------------------------------------------------------


def filter_bar() -> rx.Component:
    return rx.form(
        rx.hstack(
            rx.box(
                rx.el.label("Filter by name or description", html_for="manage-query", style=VISUALLY_HIDDEN),
                rx.input(
                    rx.input.slot(rx.icon("search", size=16)),
                    id="manage-query",
                    name="query",
                    placeholder="Filter by name or description",
                    default_value=ManageState.query,
                    type="search",
                    size="3",
                    width="100%",
                ),
                flex="1",
                min_width="12em",
            ),
            rx.button("Filter", type="submit", size="3", variant="soft"),
            spacing="2",
            width="100%",
            wrap="wrap",
        ),
        on_submit=ManageState.apply_filter,
        reset_on_submit=False,
        role="search",
        width="100%",
    )


def toolbar() -> rx.Component:
    count = ManageState.selected.length()
    return rx.flex(
        rx.el.label(
            rx.hstack(
                rx.checkbox(
                    checked=ManageState.all_on_page_selected,
                    on_change=ManageState.toggle_page,
                    size="2",
                ),
                rx.text("Select all on this page", size="2"),
                align="center",
                spacing="2",
            ),
        ),
        rx.spacer(),
        rx.text(count.to_string() + " selected", size="2", color_scheme="gray", data_testid="selected-count"),
        rx.button(
            rx.icon("refresh-cw", size=14),
            "Re-embed selected",
            on_click=ManageState.reembed(ManageState.selected),
            disabled=(count == 0) | ManageState.busy,
            variant="soft",
            size="2",
        ),
        rx.button(
            rx.icon("trash-2", size=14),
            "Delete selected",
            on_click=ManageState.ask_delete(ManageState.selected),
            disabled=(count == 0) | ManageState.busy,
            color_scheme="red",
            variant="soft",
            size="2",
            data_testid="delete-selected",
        ),
        rx.cond(
            count > 0,
            rx.button("Clear", on_click=ManageState.clear_selection, variant="ghost", size="2", color_scheme="gray"),
        ),
        align="center",
        spacing="3",
        wrap="wrap",
        width="100%",
    )


def image_row(row: rx.Var) -> rx.Component:
    return rx.card(
        rx.flex(
            rx.checkbox(
                checked=ManageState.selected.contains(row["id"]),
                on_change=lambda checked: ManageState.toggle(row["id"], checked),
                aria_label="Select " + row["name"],
                size="3",
            ),
            rx.link(
                rx.image(
                    src=row["thumb"],
                    alt=row["name"],
                    width="5em",
                    height="5em",
                    object_fit="cover",
                    border_radius="var(--radius-3)",
                    loading="lazy",
                    background=rx.color("gray", 3),
                ),
                href=row["href"],
                flex_shrink="0",
            ),
            rx.vstack(
                rx.text(row["name"], weight="bold", size="3", trim="both"),
                rx.text(
                    rx.cond(row["description"] != "", row["description"], "No description"),
                    size="2",
                    color_scheme="gray",
                    style={"display": "-webkit-box", "-webkit-line-clamp": "2", "-webkit-box-orient": "vertical"},
                    overflow="hidden",
                ),
                rx.hstack(
                    rx.text(row["details"], size="1", color_scheme="gray"),
                    rx.cond(
                        row["embedded"] == "no",
                        rx.badge("no vector", color_scheme="amber", size="1"),
                    ),
                    spacing="2",
                    wrap="wrap",
                    align="center",
                ),
                spacing="1",
                flex="1 1 12em",
                min_width="0",
            ),
            rx.hstack(
                rx.icon_button(
                    rx.icon("pencil", size=16),
                    on_click=ManageState.open_edit(row["id"]),
                    variant="soft",
                    aria_label="Edit " + row["name"],
                    title="Edit name and description",
                ),
                rx.icon_button(
                    rx.icon("refresh-cw", size=16),
                    on_click=ManageState.reembed([row["id"]]),
                    variant="soft",
                    aria_label="Re-embed " + row["name"],
                    title="Re-embed",
                    disabled=ManageState.busy,
                ),
                rx.icon_button(
                    rx.icon("trash-2", size=16),
                    on_click=ManageState.ask_delete([row["id"]]),
                    variant="soft",
                    color_scheme="red",
                    aria_label="Delete " + row["name"],
                    title="Delete",
                ),
                spacing="2",
                flex_shrink="0",
            ),
            align="center",
            spacing="3",
            wrap=rx.breakpoints(initial="wrap", sm="nowrap"),
            width="100%",
        ),
        width="100%",
        data_testid="manage-row",
        data_image_id=row["id"],
    )


def edit_dialog() -> rx.Component:
    return rx.dialog.root(
        rx.dialog.content(
            rx.dialog.title("Edit image"),
            rx.dialog.description("The name and the description are searchable and shown on hover.", size="2"),
            rx.form(
                rx.vstack(
                    rx.vstack(
                        field_label("Name", "edit-name"),
                        rx.input(
                            id="edit-name",
                            name="name",
                            default_value=ManageState.edit_name,
                            required=True,
                            max_length=ingest.MAX_NAME,
                            width="100%",
                        ),
                        spacing="1",
                        width="100%",
                    ),
                    rx.vstack(
                        field_label("Description", "edit-description"),
                        rx.text_area(
                            id="edit-description",
                            name="description",
                            default_value=ManageState.edit_description,
                            rows="4",
                            max_length=ingest.MAX_DESCRIPTION,
                            width="100%",
                        ),
                        spacing="1",
                        width="100%",
                    ),
                    rx.cond(
                        ManageState.edit_error != "",
                        rx.callout(ManageState.edit_error, icon="triangle_alert", color_scheme="red", role="alert"),
                    ),
                    rx.hstack(
                        rx.dialog.close(rx.button("Cancel", variant="soft", color_scheme="gray", type="button")),
                        rx.button("Save", type="submit"),
                        justify="end",
                        spacing="3",
                        width="100%",
                    ),
                    spacing="3",
                    width="100%",
                ),
                on_submit=ManageState.save_edit,
                reset_on_submit=False,
                key=ManageState.edit_id,
            ),
            max_width="32em",
        ),
        open=ManageState.edit_open,
        on_open_change=ManageState.set_edit_open,
    )


def pager() -> rx.Component:
    return rx.hstack(
        rx.button(
            rx.icon("chevron-left", size=16),
            "Previous",
            on_click=ManageState.go_page(-1),
            disabled=~ManageState.has_previous,
            variant="soft",
        ),
        rx.text(ManageState.page_label, size="2", color_scheme="gray", data_testid="manage-page-label"),
        rx.button(
            "Next",
            rx.icon("chevron-right", size=16),
            on_click=ManageState.go_page(1),
            disabled=~ManageState.has_next,
            variant="soft",
        ),
        align="center",
        justify="between",
        width="100%",
    )


def manage_panel() -> rx.Component:
    return rx.vstack(
        filter_bar(),
        toolbar(),
        rx.cond(
            ManageState.error != "",
            rx.callout(ManageState.error, icon="triangle_alert", color_scheme="red", role="alert", width="100%"),
        ),
        rx.cond(
            ManageState.rows.length() > 0,
            rx.vstack(rx.foreach(ManageState.rows, image_row), spacing="2", width="100%"),
            rx.cond(
                ManageState.loading,
                rx.spinner(size="3"),
                rx.text(
                    rx.cond(
                        ManageState.query != "",
                        "No image matches this filter.",
                        "No images yet: add some on the Upload page, or index a folder.",
                    ),
                    color_scheme="gray",
                ),
            ),
        ),
        pager(),
        edit_dialog(),
        delete_dialog(ManageState),
        spacing="3",
        width="100%",
    )


def admin_manage() -> rx.Component:
    return admin_frame(
        "/admin/manage",
        "Manage images",
        "Find images, correct their names and descriptions, delete or re-embed them.",
        manage_panel(),
    )
