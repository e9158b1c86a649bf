"""/admin/jobs: index a folder on the server, or re-embed every image, in the background.

Each job is a background event: it checks the administrator, takes the process-wide job slot
(one job at a time), runs the service function in a worker thread and, every half second,
copies the progress that the service's `on_progress` callback recorded into the page inside a
short `async with self` block. The closing summary is the same text the CLI prints.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import reflex as rx

from clipgallery import bulk, db, ingest
from clipgallery.config import get_settings
from clipgallery.embedding import ModelUnavailableError, get_embedder
from clipgallery.gallery import ModelMismatchError
from clipgallery.pages.admin_common import AdminState, Refused, admin_frame, check_admin_token, field_label
from clipgallery.storage import Storage

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
MAX_SUMMARY_LINES = 200

# One job at a time in this process: indexing and re-embedding both keep the model busy.
_job_slot = threading.Lock()
_job_name = ""


@dataclass
class Progress:
    """Written by the worker thread (on_progress), read by the event loop."""

    done: int = 0
    total: int = 0
    counts: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def update(self, done: int, total: int, counts: str = "") -> None:
        with self._lock:
            self.done, self.total, self.counts = done, total, counts

    def snapshot(self) -> tuple[int, int, str]:
        with self._lock:
            return self.done, self.total, self.counts


BUILDING_INDEX = "building the vector index (searches scan every image until it is ready)"


def _counts(summary: bulk.IndexSummary) -> str:
    counts = (
        f"indexed {summary.indexed}, updated {summary.updated}, reused {summary.reused}, "
        f"skipped {summary.skipped}, rejected {len(summary.rejected)}"
    )
    return f"{counts}; {BUILDING_INDEX}" if summary.building_index else counts


def _run_index(root: Path, recursive: bool, metadata: bulk.MetadataMapping | None, progress: Progress) -> list[str]:
    settings = get_settings()
    with db.session_scope(settings) as session:
        summary = bulk.index_folder(
            session,
            get_embedder(settings),
            Storage(settings.upload_dir),
            root,
            recursive=recursive,
            metadata=metadata,
            progress=False,
            on_progress=lambda done, total, s: progress.update(done, total, _counts(s)),
        )
    return summary.lines()


def _run_reembed(progress: Progress) -> list[str]:
    settings = get_settings()
    with db.session_scope(settings) as session:
        done = ingest.reembed_images(
            session,
            get_embedder(settings),
            Storage(settings.upload_dir),
            image_ids=None,
            progress=False,
            on_progress=lambda d, total: progress.update(d, total, f"{d} of {total} images"),
            on_index_build=lambda: progress.update(*progress.snapshot()[:2], f"all images done; {BUILDING_INDEX}"),
        )
    return [f"re-embedded {done} image{'s' if done != 1 else ''} with {get_embedder(settings).identity}"]


def _optional(form: dict, key: str) -> str | None:
    value = str(form.get(key) or "").strip()
    return value or None


class JobsState(AdminState):
    running: bool = False
    job: str = ""  # "index" | "reembed" while running or after finishing
    done: int = 0
    total: int = 0
    counts: str = ""
    summary: rx.Field[list[str]] = rx.field(default_factory=list)
    error: str = ""

    @rx.var
    def percent(self) -> int:
        return round(100 * self.done / self.total) if self.total else 0

    async def _run(self, name: str, work, *args):
        """Check the administrator, take the job slot, run `work(*args, progress)` in a thread and
        push its progress to the page until it ends. Yields events for the page."""
        global _job_name
        async with self:
            token = self.session_token
        try:
            await check_admin_token(token)
        except Refused as refused:
            async with self:
                self.error = refused.message
                return self._refusal(refused)
        if not _job_slot.acquire(blocking=False):
            async with self:
                self.error = f"Another job is running ({_job_name or 'starting'}): wait until it ends."
            return None
        try:
            _job_name = {"index": "indexing a folder", "reembed": "re-embedding"}[name]
            progress = Progress()
            async with self:
                self.running, self.job, self.error = True, name, ""
                self.done, self.total, self.counts, self.summary = 0, 0, "", []
            task = asyncio.ensure_future(asyncio.to_thread(work, *args, progress))
            while not task.done():
                await asyncio.wait({task}, timeout=POLL_SECONDS)
                done, total, counts = progress.snapshot()
                async with self:
                    self.done, self.total, self.counts = done, total, counts
            try:
                lines = task.result()
            except (bulk.IndexingError, ModelUnavailableError, ModelMismatchError) as exc:
                async with self:
                    self.error = str(exc)
                return None
            except Exception as exc:
                log.exception("%s failed", name)
                async with self:
                    self.error = f"The job failed: {type(exc).__name__}: {exc}"
                return None
            async with self:
                self.summary = lines[:MAX_SUMMARY_LINES]
                if len(lines) > MAX_SUMMARY_LINES:
                    self.summary.append(f"… and {len(lines) - MAX_SUMMARY_LINES} more lines")
            return rx.toast.success("Done: " + lines[0] if lines else "Done.")
        finally:
            _job_name = ""
            _job_slot.release()
            async with self:
                self.running = False

    @rx.event(background=True)
    async def start_index(self, form: dict):
        folder = _optional(form, "folder")
        if not folder:
            async with self:
                self.error = "Enter the folder to index (a path on the server)."
            return None
        metadata = None
        csv_path = _optional(form, "metadata")
        if csv_path:
            metadata = bulk.MetadataMapping(
                csv_path=Path(csv_path).expanduser(),
                file_column=_optional(form, "file_column"),
                name_template=_optional(form, "name_template"),
                description_template=_optional(form, "description_template"),
            )
        recursive = str(form.get("recursive") or "").lower() in ("on", "true", "1")
        return await self._run("index", _run_index, Path(folder), recursive, metadata)

    @rx.event(background=True)
    async def start_reembed(self):
        return await self._run("reembed", _run_reembed)


# --- page ------------------------------------------------------------------------------------------


def _text_field(label: str, name: str, placeholder: str = "", required: bool = False) -> rx.Component:
    return rx.vstack(
        field_label(label, f"job-{name}"),
        rx.input(id=f"job-{name}", name=name, placeholder=placeholder, required=required, width="100%"),
        spacing="1",
        width="100%",
    )


def index_form() -> rx.Component:
    return rx.card(
        rx.form(
            rx.vstack(
                rx.heading("Index a folder", size="4", as_="h2"),
                rx.text(
                    "Adds the images in a folder on the server. Unchanged files are skipped on later runs.",
                    size="2",
                    color_scheme="gray",
                ),
                _text_field("Folder on the server", "folder", "/srv/photos", required=True),
                rx.el.label(
                    rx.hstack(
                        rx.checkbox(name="recursive", id="job-recursive"),
                        rx.text("Include subfolders", size="2"),
                        align="center",
                        spacing="2",
                    ),
                ),
                rx.accordion.root(
                    rx.accordion.item(
                        header=rx.text("Names and descriptions from a CSV file (optional)", size="2", weight="medium"),
                        content=rx.vstack(
                            _text_field("CSV file on the server", "metadata", "/srv/photos/labels.csv"),
                            _text_field("File column", "file_column", "filename"),
                            _text_field("Name template", "name_template", "{productDisplayName}"),
                            _text_field("Description template", "description_template", "{baseColour} {articleType}"),
                            spacing="3",
                            width="100%",
                            color="var(--gray-12)",  # labels like the form's others, not the accordion's accent
                        ),
                        value="csv",
                    ),
                    collapsible=True,
                    type="single",
                    variant="ghost",
                    width="100%",
                ),
                rx.button(
                    rx.icon("folder-search", size=16),
                    "Start indexing",
                    type="submit",
                    disabled=JobsState.running,
                    data_testid="start-index",
                ),
                spacing="3",
                width="100%",
            ),
            on_submit=JobsState.start_index,
            reset_on_submit=False,
        ),
        width="100%",
    )


def reembed_card() -> rx.Component:
    return rx.card(
        rx.vstack(
            rx.heading("Re-embed everything", size="4", as_="h2"),
            rx.text(
                "Computes the vector of every image whose vector is missing or was made by another model "
                "(after changing the model).",
                size="2",
                color_scheme="gray",
            ),
            rx.button(
                rx.icon("refresh-cw", size=16),
                "Re-embed all images",
                on_click=JobsState.start_reembed,
                disabled=JobsState.running,
                variant="soft",
                data_testid="start-reembed",
            ),
            spacing="3",
            width="100%",
        ),
        width="100%",
    )


def job_status() -> rx.Component:
    # A fragment: nothing (and no gap) while there is nothing to show.
    return rx.fragment(
        rx.cond(
            JobsState.running,
            rx.card(
                rx.vstack(
                    rx.hstack(
                        rx.spinner(),
                        rx.text(
                            rx.cond(JobsState.job == "index", "Indexing", "Re-embedding"),
                            ": ",
                            JobsState.done.to_string(),
                            " of ",
                            JobsState.total.to_string(),
                            weight="medium",
                        ),
                        align="center",
                        spacing="2",
                    ),
                    rx.progress(value=JobsState.percent, max=100, width="100%"),
                    rx.text(JobsState.counts, size="2", color_scheme="gray"),
                    spacing="2",
                    width="100%",
                ),
                width="100%",
                role="status",
                data_testid="job-progress",
            ),
        ),
        rx.cond(
            JobsState.error != "",
            rx.callout(
                JobsState.error,
                icon="triangle_alert",
                color_scheme="red",
                role="alert",
                width="100%",
                data_testid="job-error",
            ),
        ),
        rx.cond(
            JobsState.summary.length() > 0,
            rx.card(
                rx.vstack(
                    rx.heading("Summary", size="3", as_="h2"),
                    rx.box(
                        rx.foreach(JobsState.summary, lambda line: rx.text(line, size="2")),
                        font_family="var(--code-font-family)",
                        white_space="pre-wrap",
                        overflow_wrap="anywhere",
                        width="100%",
                    ),
                    spacing="2",
                    width="100%",
                ),
                width="100%",
                role="status",
                data_testid="job-summary",
            ),
        ),
    )


def admin_jobs() -> rx.Component:
    return admin_frame(
        "/admin/jobs",
        "Index & re-embed",
        "Long jobs run on the server in the background; this page shows their progress.",
        job_status(),
        rx.grid(index_form(), reembed_card(), columns=rx.breakpoints(initial="1", lg="2"), spacing="4", width="100%"),
    )
