"""The results grid: tiles with a hover / focus / tap caption, paging, and the calm states
(empty gallery, no match, error) shown instead of a grid.

A tile is a link to the image page. Its caption (name + description) is hidden until the tile
is hovered, holds keyboard focus (:focus-within) or was tapped once on a touch screen (the
first tap sets data-revealed, see client.py; the second tap opens the image).
"""

from __future__ import annotations

import reflex as rx

from clipgallery.webquery import Tile

# Radix breakpoints: xs 520px, sm 768px, md 1024px, lg 1280px, xl 1640px.
GRID_COLUMNS = {"initial": "2", "xs": "2", "sm": "3", "md": "4", "lg": "5", "xl": "6"}

_SHOWN = {"visibility": "visible", "opacity": "1", "transform": "none"}

GRID_STYLE = {
    "& .cg-overlay": {
        "visibility": "hidden",
        "opacity": "0",
        "transform": "translateY(6px)",
        "transition": "opacity 120ms ease, transform 120ms ease, visibility 120ms",
    },
    "& .cg-more": {"visibility": "hidden", "opacity": "0", "transition": "opacity 120ms ease, visibility 120ms"},
    "& .cg-tile:hover .cg-overlay, & .cg-tile:focus-within .cg-overlay, & .cg-tile[data-revealed] .cg-overlay": (
        _SHOWN
    ),
    "& .cg-tile:hover .cg-more, & .cg-tile:focus-within .cg-more, & .cg-tile[data-revealed] .cg-more": _SHOWN,
    "& .cg-tile:hover img": {"transform": "scale(1.03)"},
    "& .cg-tile-link:focus-visible": {"outline": "3px solid var(--accent-9)", "outline-offset": "3px"},
    "& .cg-more:focus-visible": {"outline": "3px solid var(--accent-9)", "outline-offset": "2px"},
    "@media (prefers-reduced-motion: reduce)": {"& .cg-overlay, & img": {"transition": "none !important"}},
}


def score_badge(item: rx.Var[Tile]) -> rx.Component:
    return rx.cond(
        item.score != "",
        rx.badge(
            # Hybrid search can rank a word match above a closer image: the mark says why its
            # number sits out of order (the tooltip says it in words).
            rx.cond(
                item.text_match,
                rx.icon("text_search", size=12, aria_label="matches your words", data_testid="tile-text-match"),
            ),
            item.score,
            title=item.score_title,
            variant="solid",
            color_scheme="gray",
            high_contrast=True,
            radius="full",
            class_name="cg-score",
            data_testid="tile-score",
            position="absolute",
            top="0.5em",
            left="0.5em",
            pointer_events="none",
            font_variant_numeric="tabular-nums",
            opacity="0.88",
        ),
    )


def tile(item: rx.Var[Tile], show_score: bool = True) -> rx.Component:
    """One result: the thumbnail (alt = the image's name), score badge, caption, "more like this"."""
    return rx.box(
        rx.link(
            rx.image(
                src=item.thumbnail_url,
                alt=item.name,
                loading="lazy",
                decoding="async",
                width="100%",
                height="100%",
                object_fit="cover",
                transition="transform 200ms ease",
            ),
            rx.box(
                rx.text(item.name, size="2", weight="bold", trim="both", class_name="cg-name"),
                rx.cond(
                    item.description != "",
                    rx.text(
                        item.description,
                        size="1",
                        class_name="cg-desc",
                        data_testid="tile-description",
                        style={
                            "display": "-webkit-box",
                            "-webkit-line-clamp": "3",
                            "-webkit-box-orient": "vertical",
                            "overflow": "hidden",
                        },
                    ),
                ),
                class_name="cg-overlay",
                data_testid="tile-caption",
                position="absolute",
                left="0",
                right="0",
                bottom="0",
                padding="2.5em 0.75em 0.7em",
                color="white",
                background="linear-gradient(to top, rgba(0,0,0,0.82), rgba(0,0,0,0.55) 60%, transparent)",
                display="flex",
                flex_direction="column",
                gap="0.3em",
            ),
            href=f"/image/{item.id}",
            class_name="cg-tile-link",
            underline="none",
            display="block",
            position="relative",
            overflow="hidden",
            border_radius="var(--radius-4)",
            aspect_ratio="4 / 3",
            background="var(--gray-a3)",
            _hover={},
        ),
        score_badge(item) if show_score else rx.fragment(),
        rx.link(
            rx.icon("sparkles", size=14),
            "Similar",
            href=f"/similar/{item.id}",
            class_name="cg-more",
            aria_label="More like " + item.name,
            title="More like this",
            underline="none",
            size="1",
            weight="medium",
            position="absolute",
            top="0.5em",
            right="0.5em",
            display="inline-flex",
            align_items="center",
            gap="0.25em",
            padding="0.25em 0.6em",
            border_radius="var(--radius-thumb)",
            background="var(--color-panel-solid)",
            color="var(--gray-12)",
            box_shadow="var(--shadow-2)",
        ),
        class_name="cg-tile",
        data_testid="result-tile",
        data_id=item.id,
        data_score=item.score,
        position="relative",
    )


def tile_grid(items: rx.Var[list[Tile]], show_score: bool = True, testid: str = "results-grid") -> rx.Component:
    return rx.grid(
        rx.foreach(items, lambda item: tile(item, show_score)),
        columns=GRID_COLUMNS,
        spacing={"initial": "3", "sm": "4"},
        width="100%",
        style=GRID_STYLE,
        data_testid=testid,
    )


def pager(
    page: rx.Var[int],
    has_more: rx.Var[bool],
    prev_href: rx.Var[str],
    next_href: rx.Var[str],
) -> rx.Component:
    """Previous / next as links, so every page has its own address."""
    return rx.hstack(
        rx.cond(
            page > 1,
            rx.link(rx.button(rx.icon("chevron-left", size=16), "Previous", variant="soft"), href=prev_href),
            rx.button(rx.icon("chevron-left", size=16), "Previous", variant="soft", disabled=True),
        ),
        rx.text("Page ", page, size="2", color_scheme="gray", data_testid="page-number"),
        rx.cond(
            has_more,
            rx.link(rx.button("Next", rx.icon("chevron-right", size=16), variant="soft"), href=next_href),
            rx.button("Next", rx.icon("chevron-right", size=16), variant="soft", disabled=True),
        ),
        justify="center",
        align="center",
        spacing="4",
        width="100%",
        padding_top="1.5em",
        as_="nav",
        aria_label="Result pages",
    )


def message_card(icon: str, title: str, *body: rx.Component, testid: str, color: str = "gray") -> rx.Component:
    return rx.card(
        rx.hstack(
            rx.box(
                rx.icon(icon, size=22, color=rx.color(color, 11)),
                padding="0.6em",
                border_radius="full",
                background=rx.color(color, 3),
                flex_shrink="0",
            ),
            rx.vstack(rx.heading(title, size="4", as_="h2"), *body, spacing="2", align="start"),
            spacing="4",
            align="start",
        ),
        size="3",
        width="100%",
        max_width="46em",
        margin_x="auto",
        margin_y="1.5em",
        data_testid=testid,
    )


def empty_gallery() -> rx.Component:
    return message_card(
        "image-plus",
        "No images yet",
        rx.text("The gallery is empty. Two ways to add pictures:", color_scheme="gray"),
        rx.unordered_list(
            rx.list_item(
                "index a folder on the server: ",
                rx.code("clipgallery index ~/Pictures --recursive"),
            ),
            rx.list_item(
                "or log in as an admin and use the ",
                rx.link("upload form", href="/admin"),
                ".",
            ),
            color=rx.color("gray", 11),
        ),
        testid="empty-gallery",
        color="accent",
    )


def no_match(*hints: rx.Component) -> rx.Component:
    return message_card(
        "search-x",
        "No matching images",
        rx.text(
            "Nothing passed the minimum similarity and filters. Try other words, a lower minimum "
            "similarity, or fewer filters.",
            color_scheme="gray",
        ),
        *hints,
        testid="no-match",
    )


def error_callout(message: rx.Var[str]) -> rx.Component:
    return rx.callout(
        message,
        icon="triangle-alert",
        color_scheme="red",
        role="alert",
        width="100%",
        data_testid="search-error",
    )


def loading_grid() -> rx.Component:
    return rx.grid(
        *[rx.skeleton(rx.box(aspect_ratio="4 / 3", width="100%"), loading=True) for _ in range(10)],
        columns=GRID_COLUMNS,
        spacing={"initial": "3", "sm": "4"},
        width="100%",
        data_testid="results-loading",
        aria_busy="true",
    )
