"""The filter fields (words, uploader, date range, format), shared by the search and browse pages."""

from __future__ import annotations

import reflex as rx

from clipgallery.pages.filters import FilterState
from clipgallery.webquery import ANY, FORMAT_LABELS


def labelled(label: str, control: rx.Component, html_for: str) -> rx.Component:
    return rx.vstack(
        rx.el.label(label, html_for=html_for, style={"font-size": "var(--font-size-1)", "font-weight": "500"}),
        control,
        spacing="1",
        width="100%",
        min_width="0",
    )


def select_field(label: str, field_id: str, value, on_change, items: list[tuple[str, str]] | rx.Var) -> rx.Component:
    if isinstance(items, rx.Var):
        options = rx.foreach(items, lambda name: rx.select.item(name, value=name))
        fixed = [rx.select.item("Anyone", value=ANY)]
    else:
        options = None
        fixed = [rx.select.item(text, value=val) for val, text in items]
    return labelled(
        label,
        rx.select.root(
            rx.select.trigger(id=field_id, width="100%", aria_label=label),
            rx.select.content(*fixed, *([options] if options is not None else [])),
            value=value,
            on_change=on_change,
            name=field_id,
        ),
        field_id,
    )


def date_field(label: str, field_id: str, value, on_change) -> rx.Component:
    # Named as well: Reflex 0.11 submits form controls by name only.
    control = rx.input(id=field_id, name=field_id, type="date", value=value, on_change=on_change, width="100%")
    return labelled(label, control, field_id)


def filter_fields() -> rx.Component:
    """The five filter controls in a responsive grid (labelled; values live in FilterState)."""
    return rx.grid(
        labelled(
            "Name or description contains",
            rx.input(
                id="filter-text",
                name="filter-text",
                value=FilterState.f_text,
                on_change=FilterState.set_f_text,
                placeholder="e.g. beach",
                width="100%",
            ),
            "filter-text",
        ),
        select_field(
            "Uploaded by",
            "filter-uploader",
            FilterState.f_uploader,
            FilterState.set_f_uploader,
            FilterState.uploader_options,
        ),
        date_field("Added from", "filter-from", FilterState.f_from, FilterState.set_f_from),
        date_field("Added until", "filter-to", FilterState.f_to, FilterState.set_f_to),
        select_field(
            "Format",
            "filter-format",
            FilterState.f_format,
            FilterState.set_f_format,
            [(ANY, "Any format"), *FORMAT_LABELS.items()],
        ),
        columns={"initial": "1", "xs": "2", "md": "5"},
        spacing="3",
        width="100%",
        data_testid="filter-fields",
    )
