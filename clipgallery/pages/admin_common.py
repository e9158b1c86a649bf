"""What every admin page shares: the server-side check each handler starts with, and the frame.

Protection is on the server: every admin event handler that reads or changes gallery data or
accounts first resolves the session cookie in the database (`AdminState._require_admin`, or
`session.admin_for_token` in background handlers). A refused handler does nothing else: it
shows why and, when the session is gone, sends the browser to the login page. Hiding the
admin content for non-admins (`admin_frame`) is only presentation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import reflex as rx

from clipgallery import auth, db, gallery
from clipgallery.components.layout import page_shell
from clipgallery.config import get_settings
from clipgallery.pages.session import SessionState, admin_for_token
from clipgallery.storage import Storage

ADMIN_SECTIONS = (
    ("Upload", "/admin", "upload"),
    ("Manage", "/admin/manage", "images"),
    ("Duplicates", "/admin/duplicates", "copy"),
    ("Index & re-embed", "/admin/jobs", "folder-sync"),
    ("Users", "/admin/users", "users"),
)
MAX_DELETE_AT_ONCE = 500  # ids one confirmation deletes (the dialog says how many)


class Refused(Exception):
    """An admin handler was called without a live administrator session."""

    def __init__(self, message: str, login: bool) -> None:
        super().__init__(message)
        self.message = message
        self.login = login


def refusal_for(exc: Exception) -> Refused:
    if isinstance(exc, auth.PermissionDenied):
        return Refused("This needs an administrator.", login=False)
    return Refused("Please log in as an administrator: your session has ended or was never started.", login=True)


async def check_admin_token(token: str) -> auth.CurrentUser:
    """The administrator behind `token` (checked in the database, off the event loop); raises Refused."""
    try:
        return await asyncio.to_thread(admin_for_token, token)
    except (auth.AuthError, auth.PermissionDenied) as exc:
        raise refusal_for(exc) from None


class AdminState(SessionState):
    """Base of the admin pages' states. It holds no data of its own: each page's substate
    keeps its own small state (ids, names, paging), and calls `_require_admin` first."""

    async def _require_admin(self) -> auth.CurrentUser:
        """For regular (non-background) handlers, which hold the state lock."""
        return await check_admin_token(self.session_token)

    def _refusal(self, refused: Refused) -> list:
        events: list = [rx.toast.error(refused.message, id="admin-refused")]
        if refused.login:
            events.append(self.login_redirect())
        return events

    @rx.event
    async def check_page(self):
        """on_load of every admin page: anonymous visitors go to the login page."""
        try:
            await self._require_admin()
        except Refused as refused:
            return self._refusal(refused)
        return None


def _delete_images(image_ids: list[int]) -> int:
    settings = get_settings()
    with db.session_scope(settings) as session:
        return gallery.delete_images(session, Storage(settings.upload_dir), image_ids)


class DeleteImagesMixin(rx.State, mixin=True):
    """Deleting images from an admin page: `ask_delete` opens the confirmation (`delete_dialog`),
    `confirm_delete` deletes and calls the page's `_after_delete`. For states that also derive
    from AdminState (the administrator is checked at both steps)."""

    delete_open: bool = False
    delete_ids: rx.Field[list[str]] = rx.field(default_factory=list)
    busy: bool = False

    @rx.var
    def delete_prompt(self) -> str:
        n = len(self.delete_ids)
        return f"Delete {n} image{'s' if n != 1 else ''}?"

    async def _after_delete(self, image_ids: list[int]) -> None:
        """What the page shows once `image_ids` are gone."""

    @rx.event
    async def ask_delete(self, image_ids: list[str]):
        try:
            await self._require_admin()
        except Refused as refused:
            return self._refusal(refused)
        self.delete_ids = [str(i) for i in image_ids][:MAX_DELETE_AT_ONCE]
        self.delete_open = bool(self.delete_ids)
        return None

    @rx.event
    async def confirm_delete(self):
        try:
            await self._require_admin()
        except Refused as refused:
            self.delete_open = False
            return self._refusal(refused)
        ids = [int(i) for i in self.delete_ids]
        self.busy = True
        try:
            deleted = await asyncio.to_thread(_delete_images, ids)
        finally:
            self.busy = False
        self.delete_open = False
        self.delete_ids = []
        await self._after_delete(ids)
        return rx.toast.success(f"Deleted {deleted} image{'s' if deleted != 1 else ''}.")

    @rx.event
    def set_delete_open(self, value: bool):
        self.delete_open = value
        if not value:
            self.delete_ids = []


def admin_on_load(*handlers: Callable) -> list:
    """The on_load chain of an admin page: who is logged in, the admin check, then the page's own loader."""
    return [SessionState.refresh, AdminState.check_page, *handlers]


def _section_link(label: str, href: str, icon: str, current: str) -> rx.Component:
    active = href == current
    return rx.link(
        rx.hstack(rx.icon(icon, size=16), rx.text(label), align="center", spacing="2"),
        href=href,
        underline="none",
        padding_x="0.75em",
        padding_y="0.4em",
        border_radius="var(--radius-3)",
        weight="medium",
        size="2",
        color_scheme="gray",
        high_contrast=active,
        background=rx.color("accent", 4) if active else "transparent",
        aria_current="page" if active else None,
        white_space="nowrap",
        _hover={"background": rx.color("accent", 3)},
    )


def admin_nav(current: str) -> rx.Component:
    return rx.box(
        rx.hstack(
            *[_section_link(label, href, icon, current) for label, href, icon in ADMIN_SECTIONS],
            spacing="1",
            wrap="wrap",
        ),
        as_="nav",
        aria_label="Administration",
        border_bottom="1px solid var(--gray-a5)",
        padding_bottom="0.5em",
        width="100%",
    )


def refused_notice() -> rx.Component:
    return rx.callout(
        rx.vstack(
            rx.text("This page is for administrators."),
            rx.link("Log in", href="/login?next=" + SessionState.router.url.path),
            spacing="1",
        ),
        icon="lock",
        color_scheme="amber",
        role="alert",
        data_testid="admin-refused",
    )


def admin_frame(current: str, title: str, subtitle: str, *children: rx.Component) -> rx.Component:
    """An admin page: the site frame, the admin sections, and the content for administrators only."""
    return page_shell(
        rx.vstack(
            rx.vstack(
                rx.heading(title, size="7", as_="h1"),
                rx.text(subtitle, color_scheme="gray", size="3"),
                spacing="1",
            ),
            admin_nav(current),
            rx.cond(
                SessionState.is_admin,
                rx.vstack(*children, spacing="5", width="100%"),
                rx.cond(SessionState.session_checked, refused_notice(), rx.spinner(size="3")),
            ),
            spacing="4",
            width="100%",
        ),
    )


def delete_dialog(state: type[DeleteImagesMixin]) -> rx.Component:
    """The "delete for good?" confirmation of an admin page."""
    return rx.alert_dialog.root(
        rx.alert_dialog.content(
            rx.alert_dialog.title(state.delete_prompt),
            rx.alert_dialog.description(
                "The originals, their thumbnails and their vectors are removed for good.", size="2"
            ),
            rx.hstack(
                rx.alert_dialog.cancel(rx.button("Cancel", variant="soft", color_scheme="gray")),
                rx.button(
                    "Delete",
                    color_scheme="red",
                    on_click=state.confirm_delete,
                    loading=state.busy,
                    data_testid="confirm-delete",
                ),
                justify="end",
                spacing="3",
                margin_top="1em",
            ),
            max_width="28em",
        ),
        open=state.delete_open,
        on_open_change=state.set_delete_open,
    )


def field_label(text: str, html_for: str) -> rx.Component:
    return rx.el.label(text, html_for=html_for, style={"font_weight": "500", "font_size": "var(--font-size-2)"})


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{int(size)} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} bytes"
