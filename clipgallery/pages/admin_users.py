"""/admin/users: the administrators, adding one, and changing one's own password.

Passwords only pass through the handlers (form data); they are never state vars.
"""

from __future__ import annotations

import asyncio

import reflex as rx

from clipgallery import auth, db
from clipgallery.config import get_settings
from clipgallery.pages.admin_common import AdminState, Refused, admin_frame, field_label


def _list_users() -> list[auth.CurrentUser]:
    with db.session_scope(get_settings()) as session:
        return auth.list_users(session)


def _create_user(username: str, password: str) -> auth.CurrentUser:
    with db.session_scope(get_settings()) as session:
        return auth.create_user(session, username, password, is_admin=True)


def _change_password(user: auth.CurrentUser, current: str, new: str) -> None:
    with db.session_scope(get_settings()) as session:
        auth.change_own_password(session, user, current, new)


class UsersState(AdminState):
    users: rx.Field[list[dict[str, str]]] = rx.field(default_factory=list)
    add_error: str = ""
    password_error: str = ""

    async def _load(self) -> None:
        self.users = [
            {"id": str(u.id), "username": u.username, "role": "administrator" if u.is_admin else "user"}
            for u in await asyncio.to_thread(_list_users)
        ]

    @rx.event
    async def load(self):
        try:
            await self._require_admin()
        except Refused as refused:
            return self._refusal(refused)
        await self._load()
        return None

    @rx.event
    async def add_admin(self, form: dict):
        try:
            await self._require_admin()
        except Refused as refused:
            return self._refusal(refused)
        username = str(form.get("username") or "").strip()
        password = str(form.get("password") or "")
        if password != str(form.get("password_again") or ""):
            self.add_error = "The two passwords differ."
            return None
        try:
            user = await asyncio.to_thread(_create_user, username, password)
        except ValueError as exc:
            self.add_error = str(exc)
            return None
        self.add_error = ""
        await self._load()
        return rx.toast.success(f"Added the administrator {user.username}.")

    @rx.event
    async def change_password(self, form: dict):
        try:
            user = await self._require_admin()
        except Refused as refused:
            return self._refusal(refused)
        current = str(form.get("current") or "")
        new = str(form.get("new") or "")
        if new != str(form.get("new_again") or ""):
            self.password_error = "The two new passwords differ."
            return None
        try:
            await asyncio.to_thread(_change_password, user, current, new)
        except (auth.AuthError, ValueError) as exc:
            self.password_error = str(exc)
            return None
        self.password_error = ""
        # Changing a password ends every session of the user, this one included: start a new one here.
        await asyncio.to_thread(self._start_session, user)
        return rx.toast.success("Password changed. Your other sessions were logged out.")


def _password_field(label: str, name: str, autocomplete: str, prefix: str) -> rx.Component:
    return rx.vstack(
        field_label(label, f"{prefix}-{name}"),
        rx.input(
            id=f"{prefix}-{name}",
            name=name,
            type="password",
            auto_complete=autocomplete,
            required=True,
            min_length=auth.MIN_PASSWORD_LENGTH,
            width="100%",
        ),
        spacing="1",
        width="100%",
    )


def users_table() -> rx.Component:
    return rx.card(
        rx.vstack(
            rx.heading("Administrators", size="4", as_="h2"),
            rx.table.root(
                rx.table.header(
                    rx.table.row(rx.table.column_header_cell("User name"), rx.table.column_header_cell("Role")),
                ),
                rx.table.body(
                    rx.foreach(
                        UsersState.users,
                        lambda u: rx.table.row(
                            rx.table.row_header_cell(
                                u["username"],
                                rx.cond(
                                    u["username"] == UsersState.username,
                                    rx.badge("you", margin_left="0.5em", variant="soft"),
                                ),
                            ),
                            rx.table.cell(u["role"]),
                            data_testid="user-row",
                        ),
                    ),
                ),
                width="100%",
                variant="surface",
            ),
            spacing="3",
            width="100%",
        ),
        width="100%",
    )


def add_admin_form() -> rx.Component:
    return rx.card(
        rx.form(
            rx.vstack(
                rx.heading("Add an administrator", size="4", as_="h2"),
                rx.vstack(
                    field_label("User name", "new-username"),
                    rx.input(id="new-username", name="username", auto_complete="off", required=True, width="100%"),
                    spacing="1",
                    width="100%",
                ),
                _password_field("Password", "password", "new-password", "new"),
                _password_field("Password again", "password_again", "new-password", "new"),
                rx.text(f"At least {auth.MIN_PASSWORD_LENGTH} characters.", size="1", color_scheme="gray"),
                rx.cond(
                    UsersState.add_error != "",
                    rx.callout(UsersState.add_error, icon="triangle_alert", color_scheme="red", role="alert"),
                ),
                rx.button("Add administrator", type="submit"),
                spacing="3",
                width="100%",
            ),
            on_submit=UsersState.add_admin,
            reset_on_submit=True,
        ),
        width="100%",
    )


def change_password_form() -> rx.Component:
    return rx.card(
        rx.form(
            rx.vstack(
                rx.heading("Change your password", size="4", as_="h2"),
                _password_field("Current password", "current", "current-password", "own"),
                _password_field("New password", "new", "new-password", "own"),
                _password_field("New password again", "new_again", "new-password", "own"),
                rx.cond(
                    UsersState.password_error != "",
                    rx.callout(UsersState.password_error, icon="triangle_alert", color_scheme="red", role="alert"),
                ),
                rx.button("Change password", type="submit"),
                spacing="3",
                width="100%",
            ),
            on_submit=UsersState.change_password,
            reset_on_submit=True,
        ),
        width="100%",
    )


def admin_users() -> rx.Component:
    return admin_frame(
        "/admin/users",
        "Users",
        "Administrators can upload, edit and delete images, and add other administrators.",
        users_table(),
        rx.grid(
            add_admin_form(),
            change_password_form(),
            columns=rx.breakpoints(initial="1", md="2"),
            spacing="4",
            width="100%",
        ),
    )
