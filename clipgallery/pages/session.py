"""Who is logged in: the session cookie and the checks every page and admin handler use.

The cookie holds a random token; the server keeps only its hash (clipgallery.auth). Pages call
`SessionState.refresh` on load to show who is logged in, but protection never relies on that:
every admin event handler calls `self.require_admin()` on the server before doing anything.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from urllib.parse import quote, urlsplit

import reflex as rx

from clipgallery import auth, db
from clipgallery.api import SESSION_COOKIE
from clipgallery.config import get_settings


def _lookup(token: str) -> auth.CurrentUser | None:
    with db.session_scope(get_settings()) as session:
        return auth.session_user(session, token)


def admin_for_token(token: str) -> auth.CurrentUser:
    """The administrator behind a session token, checked in the database now; raises
    auth.AuthError (no live session) or auth.PermissionDenied (not an administrator).

    For background event handlers, which read the token inside `async with self` and then
    check it off the event loop."""
    with db.session_scope(get_settings()) as session:
        return auth.require_admin(session, token)


def safe_next(target: str | None) -> str:
    """Where to go after logging in: only a path on this site, never another origin
    (`//evil.example`, `https://…`, `/\\evil`), never back to the login page."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    if any(ord(ch) < 32 or ch == "\x7f" for ch in target):
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or parts.path.rstrip("/") == "/login":
        return "/"
    return target


class SessionState(rx.State):
    session_token: str = rx.Cookie("", name=SESSION_COOKIE, path="/", same_site="strict")
    username: str = ""
    is_admin: bool = False
    # The gallery needs a login to search (CLIPGALLERY_PRIVATE).
    private_gallery: bool = False
    # `refresh` has run at least once in this tab (pages can tell "not yet known" from "anonymous").
    session_checked: bool = False

    @rx.var
    def logged_in(self) -> bool:
        return self.username != ""

    def _current_user(self) -> auth.CurrentUser | None:
        """Resolve the cookie on the server, now (not from what a page load remembered)."""
        return _lookup(self.session_token) if self.session_token else None

    def require_admin(self) -> auth.CurrentUser:
        """Call first in every admin event handler; raises auth.AuthError / PermissionDenied."""
        return admin_for_token(self.session_token)

    def login_redirect(self) -> rx.event.EventSpec:
        target = self.router.url.path or "/"
        return rx.redirect(f"/login?next={quote(target, safe='/')}")

    @rx.event
    async def refresh(self):
        """On every page load: who is logged in, and send anonymous visitors of a private
        gallery to the login page."""
        settings = get_settings()
        self.private_gallery = settings.private_gallery
        user = await asyncio.to_thread(self._current_user) if self.session_token else None
        self.username = user.username if user else ""
        self.is_admin = bool(user and user.is_admin)
        self.session_checked = True
        if user is None and self.session_token:
            self.session_token = ""  # expired or revoked: forget it
        if settings.private_gallery and user is None and self.router.url.path != "/login":
            return self.login_redirect()
        return None

    def _start_session(self, user: auth.CurrentUser) -> None:
        settings = get_settings()
        with db.session_scope(settings) as session:
            self.session_token = auth.create_session(session, user, timedelta(hours=settings.session_hours))
        self.username = user.username
        self.is_admin = user.is_admin

    @rx.event
    async def logout(self):
        token = self.session_token
        if token:

            def _end() -> None:
                with db.session_scope(get_settings()) as session:
                    auth.end_session(session, token)

            await asyncio.to_thread(_end)
        self.session_token = ""
        self.username = ""
        self.is_admin = False
        return rx.redirect("/")
