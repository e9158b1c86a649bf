"""/login: user name and password; on success a server-side session and back to where the
visitor was going (`?next=`, same-site paths only)."""

from __future__ import annotations

import asyncio

import reflex as rx

from clipgallery import auth, db
from clipgallery.components.layout import page_shell
from clipgallery.config import get_settings
from clipgallery.pages.admin_common import field_label
from clipgallery.pages.session import SessionState, safe_next


def _authenticate(username: str, password: str) -> auth.CurrentUser:
    with db.session_scope(get_settings()) as session:
        return auth.authenticate(session, username, password)


def _plural_seconds(seconds: int) -> str:
    if seconds >= 120:
        minutes = (seconds + 59) // 60
        return f"{minutes} minutes"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


class LoginState(SessionState):
    """The login form. The password only passes through the handler; it is never a state var."""

    error: str = ""
    busy: bool = False

    @rx.var
    def next_path(self) -> str:
        return safe_next(self.router.url.query_parameters.get("next"))

    @rx.event
    def clear_error(self):
        self.error = ""

    @rx.event
    async def login(self, form: dict):
        username = str(form.get("username") or "").strip()
        password = str(form.get("password") or "")
        if not username or not password:
            self.error = "Enter your user name and password."
            return None
        self.busy = True
        self.error = ""
        try:
            user = await asyncio.to_thread(_authenticate, username, password)
        except auth.LockedOut as exc:
            self.error = f"Too many failed logins for this user name: try again in {_plural_seconds(exc.retry_after)}."
            return None
        except auth.AuthError:
            self.error = "Wrong user name or password."
            return None
        finally:
            self.busy = False
        await asyncio.to_thread(self._start_session, user)
        return rx.redirect(safe_next(self.router.url.query_parameters.get("next")))


def login_form() -> rx.Component:
    return rx.form(
        rx.vstack(
            rx.vstack(
                field_label("User name", "login-username"),
                rx.input(
                    id="login-username",
                    name="username",
                    auto_complete="username",
                    required=True,
                    auto_focus=True,
                    size="3",
                    width="100%",
                    on_focus=LoginState.clear_error,
                ),
                spacing="1",
                width="100%",
            ),
            rx.vstack(
                field_label("Password", "login-password"),
                rx.input(
                    id="login-password",
                    name="password",
                    type="password",
                    auto_complete="current-password",
                    required=True,
                    size="3",
                    width="100%",
                ),
                spacing="1",
                width="100%",
            ),
            rx.cond(
                LoginState.error != "",
                rx.callout(
                    LoginState.error,
                    icon="triangle_alert",
                    color_scheme="red",
                    role="alert",
                    width="100%",
                    data_testid="login-error",
                ),
            ),
            rx.button("Log in", type="submit", size="3", width="100%", loading=LoginState.busy),
            spacing="4",
            width="100%",
        ),
        on_submit=LoginState.login,
        reset_on_submit=False,
        width="100%",
        aria_label="Log in",
    )


def login() -> rx.Component:
    return page_shell(
        rx.center(
            rx.card(
                rx.vstack(
                    rx.heading("Log in", size="7", as_="h1"),
                    rx.cond(
                        SessionState.logged_in,
                        rx.vstack(
                            rx.text("You are logged in as ", rx.text.strong(SessionState.username), "."),
                            rx.link("Continue", href=LoginState.next_path),
                            spacing="2",
                        ),
                        rx.vstack(
                            rx.cond(
                                SessionState.private_gallery,
                                rx.text("This gallery is private: log in to search it.", color_scheme="gray"),
                                rx.text("Administrators log in here to add and manage images.", color_scheme="gray"),
                            ),
                            login_form(),
                            spacing="4",
                            width="100%",
                        ),
                    ),
                    spacing="4",
                    width="100%",
                ),
                size="4",
                width="100%",
                max_width="26em",
            ),
            padding_y=["1em", "4em"],
        ),
    )
