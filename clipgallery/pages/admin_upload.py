"""/admin: upload one or many images, each with a name and a description.

The browser shows previews of the selected files (object URLs, nothing leaves the machine before
"Upload"). The files then stream to a background handler that checks the administrator first,
enforces the limits on what actually arrives (files per upload, bytes per file, bytes in total),
and adds each file through `ingest.ingest_image` as soon as it is complete, pushing per-file
results to the page.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import PurePosixPath

import reflex as rx
from reflex.vars.base import Var
from reflex_base.vars import VarData
from reflex_components_core.core.upload import get_upload_files_context_var_data

from clipgallery import db, ingest
from clipgallery.config import get_settings
from clipgallery.embedding import ModelUnavailableError, get_embedder
from clipgallery.gallery import ModelMismatchError
from clipgallery.pages.admin_common import (
    AdminState,
    Refused,
    admin_frame,
    check_admin_token,
    field_label,
    human_bytes,
)
from clipgallery.storage import Storage

log = logging.getLogger(__name__)

UPLOAD_ID = "admin-upload"
MAX_FILES = 50  # files per upload request
MAX_TOTAL_BYTES = 512 * 1024 * 1024  # bytes per upload request
ACCEPT = {
    "image/jpeg": [".jpg", ".jpeg", ".jpe"],
    "image/png": [".png"],
    "image/webp": [".webp"],
    "image/gif": [".gif"],
}


# --- receiving: chunks -> complete files, with the limits enforced on what arrives ----------------


class UploadRefused(Exception):
    """The request carries more than one upload may (files or bytes): the rest is not read."""


@dataclass
class ReceivedFile:
    index: int  # position in the browser's selection
    filename: str
    data: bytes
    size: int  # bytes that arrived (data stays empty when the file was over the limit)
    problem: str = ""  # set when the file is refused before validation


async def receive_files(
    chunks: AsyncIterator, max_files: int, max_file_bytes: int, max_total_bytes: int
) -> AsyncIterator[ReceivedFile]:
    """Assemble streamed upload chunks into files, yielding each one as soon as it is complete.

    Each file part starts with a chunk at offset 0. Bytes beyond `max_file_bytes` are not kept
    (the file is reported as too large). A file beyond `max_files`, or more than
    `max_total_bytes` in all, raises UploadRefused: the caller stops reading the request.
    """
    current: ReceivedFile | None = None
    buffer = bytearray()
    total = 0
    async for chunk in chunks:
        if chunk.offset == 0:
            if current is not None:
                if not current.problem:
                    current.data = bytes(buffer)
                yield current
            buffer.clear()
            index = current.index + 1 if current is not None else 0
            if index >= max_files:
                raise UploadRefused(f"At most {max_files} files can be sent at once.")
            current = ReceivedFile(index=index, filename=chunk.filename, data=b"", size=0)
        if current is None:  # a continuation without a start: not a well-formed upload
            raise UploadRefused("The upload was malformed.")
        total += len(chunk.data)
        if total > max_total_bytes:
            raise UploadRefused(f"At most {human_bytes(max_total_bytes)} can be sent at once.")
        current.size += len(chunk.data)
        if current.problem:
            continue
        if current.size > max_file_bytes:
            current.problem = f"The file is larger than {human_bytes(max_file_bytes)}."
            buffer.clear()
            continue
        buffer += chunk.data
    if current is not None:
        if not current.problem:
            current.data = bytes(buffer)
        yield current


def _ingest(data: bytes, filename: str, name: str | None, description: str | None, user_id: int):
    settings = get_settings()
    with db.session_scope(settings) as session:
        return ingest.ingest_image(
            session,
            get_embedder(settings),
            Storage(settings.upload_dir),
            data,
            filename,
            name,
            description,
            uploaded_by=user_id,
        )


def _result(index: int, outcome: ingest.IngestOutcome) -> dict[str, str]:
    return {
        "index": str(index),
        "filename": outcome.filename,
        "name": outcome.name,
        "status": outcome.status,
        "reason": outcome.reason,
        "image_id": str(outcome.image_id or ""),
        "href": f"/image/{outcome.image_id}" if outcome.image_id else "",
    }


def _selection_key(index: int, filename: str) -> str:
    """Matches the key the page computes for the same file (position and base name)."""
    return f"{index}:{PurePosixPath(filename).name}"


class UploadState(AdminState):
    # Name and description edits, keyed by "position:file name" (unedited files get the defaults).
    names: rx.Field[dict[str, str]] = rx.field(default_factory=dict)
    descriptions: rx.Field[dict[str, str]] = rx.field(default_factory=dict)
    uploading: bool = False
    sent_percent: int = 0
    expected: int = 0
    received: int = 0
    phase: str = ""
    error: str = ""
    results: rx.Field[list[dict[str, str]]] = rx.field(default_factory=list)

    @rx.var
    def counts(self) -> str:
        if not self.results:
            return ""
        by_status = {"added": 0, "duplicate": 0, "rejected": 0}
        for row in self.results:
            by_status[row["status"]] = by_status.get(row["status"], 0) + 1
        return ", ".join(f"{n} {status}" for status, n in by_status.items() if n)

    @rx.var
    def limits(self) -> str:
        settings = get_settings()
        return (
            f"JPEG, PNG, WebP or GIF; up to {human_bytes(settings.max_upload_bytes)} and "
            f"{settings.max_image_pixels / 1e6:.0f} megapixels per image, {MAX_FILES} images per upload."
        )

    # Pure UI handlers: they only change this tab's own form state (no gallery data is read or written).
    @rx.event
    def set_name(self, key: str, value: str):
        self.names[key] = value

    @rx.event
    def set_description(self, key: str, value: str):
        self.descriptions[key] = value

    @rx.event
    def set_sent(self, progress: dict):
        self.sent_percent = round(100 * float(progress.get("progress") or 0))

    @rx.event
    def forget_selection(self):
        self.names = {}
        self.descriptions = {}
        return rx.clear_selected_files(UPLOAD_ID)

    @rx.event(background=True)
    async def upload(self, chunks: rx.UploadChunkIterator, expected: int):
        async with self:
            token = self.session_token
            if self.uploading:
                return
        try:
            user = await check_admin_token(token)
        except Refused as refused:
            # Nothing is read from the request: the upload is cut off here.
            async with self:
                self.error = refused.message
                return self._refusal(refused)
        settings = get_settings()
        async with self:
            names, descriptions = dict(self.names), dict(self.descriptions)
            self.uploading = True
            self.error = ""
            self.results = []
            self.received = 0
            self.expected = max(0, min(int(expected or 0), MAX_FILES))
            self.phase = "Sending…"
        try:
            async for item in receive_files(chunks, MAX_FILES, settings.max_upload_bytes, MAX_TOTAL_BYTES):
                key = _selection_key(item.index, item.filename)
                async with self:
                    self.received = item.index + 1
                    self.phase = f"Adding {PurePosixPath(item.filename).name}…"
                if item.problem:
                    outcome = ingest.IngestOutcome(
                        "rejected", ingest.clean_filename(item.filename), reason=item.problem
                    )
                else:
                    outcome = await asyncio.to_thread(
                        self._ingest_safely, item, names.get(key), descriptions.get(key), user.id
                    )
                async with self:
                    self.results.append(_result(item.index, outcome))
        except UploadRefused as exc:
            async with self:
                self.error = f"{exc} The rest of the upload was not read."
        finally:
            async with self:
                self.uploading = False
                self.phase = ""
                self.names = {}
                self.descriptions = {}
        return rx.clear_selected_files(UPLOAD_ID)

    @staticmethod
    def _ingest_safely(item: ReceivedFile, name: str | None, description: str | None, user_id: int):
        try:
            return _ingest(item.data, item.filename, name, description, user_id)
        except (ModelUnavailableError, ModelMismatchError) as exc:
            return ingest.IngestOutcome("rejected", ingest.clean_filename(item.filename), reason=str(exc))
        except Exception:
            log.exception("upload of %s failed", item.filename)
            return ingest.IngestOutcome(
                "rejected", ingest.clean_filename(item.filename), reason="could not be stored (see the server log)"
            )


# --- page ------------------------------------------------------------------------------------------

# The browser's selection with a preview URL each (created once per file and kept on it).
_selection = Var(
    _js_expr=(
        f'(filesById["{UPLOAD_ID}"] ? filesById["{UPLOAD_ID}"].map((f, i) => ({{'
        'key: i + ":" + f.name, '
        "name: f.name, "
        'stem: (f.name.replace(/\\.[^.]*$/, "").replace(/[_\\s]+/g, " ").trim() || "Untitled"), '
        'size: (f.size < 1048576 ? Math.round(f.size / 1024) + " KB" : (f.size / 1048576).toFixed(1) + " MB"), '
        "url: (f.__clipgalleryPreview ??= URL.createObjectURL(f))"
        "})) : [])"
    ),
    _var_type=list[dict[str, str]],
    _var_data=VarData.merge(get_upload_files_context_var_data()),
).guess_type()
_selection_count = Var(
    _js_expr=f'(filesById["{UPLOAD_ID}"] ? filesById["{UPLOAD_ID}"].length : 0)',
    _var_type=int,
    _var_data=VarData.merge(get_upload_files_context_var_data()),
).guess_type()


def dropzone() -> rx.Component:
    settings = get_settings()
    return rx.upload.root(
        rx.vstack(
            rx.icon("image-plus", size=36, color=rx.color("accent", 9)),
            rx.text("Drop images here, or press to choose files", weight="medium", size="3", align="center"),
            rx.text(UploadState.limits, size="2", color_scheme="gray", align="center"),
            align="center",
            spacing="2",
        ),
        id=UPLOAD_ID,
        multiple=True,
        accept=ACCEPT,
        max_files=MAX_FILES,
        max_size=settings.max_upload_bytes,
        disabled=UploadState.uploading,
        border=f"2px dashed {rx.color('accent', 7)}",
        border_radius="var(--radius-4)",
        padding="2em 1em",
        width="100%",
        cursor="pointer",
        background=rx.color("accent", 2),
        drag_active_style={"background": rx.color("accent", 4)},
        _focus_visible={"outline": f"3px solid {rx.color('accent', 8)}", "outline_offset": "2px"},
        aria_label="Choose images to upload",
        data_testid="upload-dropzone",
    )


def selected_card(item: Var, index: Var) -> rx.Component:
    key = item["key"]
    return rx.card(
        rx.flex(
            rx.image(
                src=item["url"],
                alt=item["name"],
                width=["100%", "9em"],
                height=["12em", "9em"],
                object_fit="cover",
                border_radius="var(--radius-3)",
                flex_shrink="0",
                background=rx.color("gray", 3),
            ),
            rx.vstack(
                rx.text(item["name"], " · ", item["size"], size="1", color_scheme="gray", trim="both"),
                rx.vstack(
                    field_label("Name", "upload-name-" + index.to_string()),
                    rx.input(
                        id="upload-name-" + index.to_string(),
                        default_value=item["stem"],
                        on_change=lambda value: UploadState.set_name(key, value),
                        width="100%",
                        max_length=ingest.MAX_NAME,
                    ),
                    spacing="1",
                    width="100%",
                ),
                rx.vstack(
                    field_label("Description", "upload-description-" + index.to_string()),
                    rx.text_area(
                        id="upload-description-" + index.to_string(),
                        placeholder="What is in the picture? (optional)",
                        on_change=lambda value: UploadState.set_description(key, value),
                        width="100%",
                        rows="2",
                        max_length=ingest.MAX_DESCRIPTION,
                    ),
                    spacing="1",
                    width="100%",
                ),
                spacing="2",
                width="100%",
            ),
            direction=rx.breakpoints(initial="column", sm="row"),
            spacing="3",
            width="100%",
        ),
        key=key,
        width="100%",
        data_testid="selected-file",
    )


_STATUS_COLOURS = {"added": "green", "duplicate": "amber", "rejected": "red"}


def result_row(row: Var) -> rx.Component:
    return rx.hstack(
        rx.match(
            row["status"],
            ("added", rx.badge("added", color_scheme="green", size="2")),
            ("duplicate", rx.badge("duplicate", color_scheme="amber", size="2")),
            rx.badge("rejected", color_scheme="red", size="2"),
        ),
        rx.vstack(
            rx.cond(
                row["href"] != "",
                rx.link(row["name"], href=row["href"], weight="medium"),
                rx.text(row["filename"], weight="medium"),
            ),
            rx.text(
                rx.match(
                    row["status"],
                    ("added", "Added to the gallery."),
                    ("duplicate", "Already in the gallery: nothing was added."),
                    row["reason"],
                ),
                size="2",
                color_scheme="gray",
            ),
            spacing="0",
            min_width="0",
        ),
        align="center",
        spacing="3",
        width="100%",
        padding_y="0.4em",
        border_bottom=f"1px solid {rx.color('gray', 4)}",
        data_testid="upload-result",
        data_status=row["status"],
    )


def upload_panel() -> rx.Component:
    return rx.vstack(
        dropzone(),
        rx.cond(
            _selection_count > 0,
            rx.vstack(
                rx.heading(_selection_count.to_string() + " selected", size="4", as_="h2"),
                rx.grid(
                    rx.foreach(_selection, selected_card),
                    columns=rx.breakpoints(initial="1", md="2", xl="3"),
                    spacing="3",
                    width="100%",
                ),
                rx.hstack(
                    rx.button(
                        rx.icon("upload", size=16),
                        "Upload ",
                        _selection_count.to_string(),
                        " image(s)",
                        on_click=UploadState.upload(
                            rx.upload_files_chunk(upload_id=UPLOAD_ID, on_upload_progress=UploadState.set_sent),
                            _selection_count,
                        ),
                        loading=UploadState.uploading,
                        size="3",
                        data_testid="upload-button",
                    ),
                    rx.button(
                        "Clear selection",
                        on_click=UploadState.forget_selection,
                        variant="soft",
                        color_scheme="gray",
                        size="3",
                        disabled=UploadState.uploading,
                    ),
                    spacing="3",
                    wrap="wrap",
                ),
                spacing="3",
                width="100%",
            ),
        ),
        rx.cond(
            UploadState.uploading,
            rx.vstack(
                rx.text("Sending files: ", UploadState.sent_percent.to_string(), " %", size="2"),
                rx.progress(value=UploadState.sent_percent, max=100, width="100%"),
                rx.text(
                    UploadState.phase,
                    " (",
                    UploadState.received.to_string(),
                    " of ",
                    UploadState.expected.to_string(),
                    ")",
                    size="2",
                    color_scheme="gray",
                ),
                width="100%",
                spacing="2",
                role="status",
                data_testid="upload-progress",
            ),
        ),
        rx.cond(
            UploadState.error != "",
            rx.callout(UploadState.error, icon="triangle_alert", color_scheme="red", role="alert", width="100%"),
        ),
        rx.cond(
            UploadState.results.length() > 0,
            rx.card(
                rx.vstack(
                    rx.hstack(
                        rx.heading("Results", size="4", as_="h2"),
                        rx.text(UploadState.counts, color_scheme="gray", size="2"),
                        align="baseline",
                        spacing="3",
                    ),
                    rx.foreach(UploadState.results, result_row),
                    spacing="1",
                    width="100%",
                ),
                width="100%",
                role="status",
                aria_live="polite",
                data_testid="upload-results",
            ),
        ),
        spacing="4",
        width="100%",
    )


def admin_upload() -> rx.Component:
    return admin_frame(
        "/admin",
        "Add images",
        "Each image gets a name and a description; both are searchable and shown on hover.",
        upload_panel(),
    )
