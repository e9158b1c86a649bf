"""The frame of every page: a navigation bar and a centred content column."""

from __future__ import annotations

import reflex as rx

from clipgallery.pages.session import SessionState


def nav_link(label: str, href: str) -> rx.Component:
    return rx.link(label, href=href, size="3", weight="medium", color_scheme="gray", high_contrast=True)


def navbar() -> rx.Component:
    return rx.box(
        rx.hstack(
            rx.link(
                rx.hstack(rx.icon("images", size=22), rx.heading("clipgallery", size="5"), align="center", spacing="2"),
                href="/",
                underline="none",
                color_scheme="gray",
                high_contrast=True,
                aria_label="clipgallery home",
            ),
            rx.spacer(),
            nav_link("Browse", "/browse"),
            rx.cond(SessionState.is_admin, nav_link("Admin", "/admin")),
            rx.cond(
                SessionState.logged_in,
                rx.hstack(
                    # On a phone the name would push the bar wider than the screen.
                    rx.text(SessionState.username, size="2", color_scheme="gray", display=["none", "none", "block"]),
                    rx.button("Log out", variant="soft", size="2", on_click=SessionState.logout),
                    align="center",
                    spacing="3",
                ),
                rx.link(rx.button("Log in", variant="soft", size="2", white_space="nowrap"), href="/login"),
            ),
            align="center",
            spacing={"initial": "3", "sm": "5"},
            width="100%",
            max_width="1600px",
            margin_x="auto",
            padding_x=["1em", "1.5em", "2em"],
            padding_y="0.75em",
        ),
        as_="nav",
        border_bottom="1px solid var(--gray-a5)",
        background="var(--color-panel-solid)",
        position="sticky",
        top="0",
        z_index="10",
        width="100%",
    )


def page_shell(*children: rx.Component, **props) -> rx.Component:
    return rx.box(
        navbar(),
        rx.box(
            *children,
            as_="main",
            width="100%",
            max_width="1600px",
            margin_x="auto",
            padding_x=["1em", "1.5em", "2em"],
            padding_y="1.5em",
            **props,
        ),
        min_height="100vh",
    )
