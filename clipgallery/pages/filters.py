"""Filters shared by browsing and similarity search (uploader, dates, format, words).

FilterState is the parent of SearchState and BrowseState: both pages read the same fields from
their address (`text`, `by`, `from`, `to`, `format`) and write them back into the addresses they
link to, so a filtered search or listing can be reloaded and shared.
"""

from __future__ import annotations

import asyncio
import logging

import reflex as rx

from clipgallery import webquery
from clipgallery.config import get_settings
from clipgallery.webquery import ANY, FilterParams

log = logging.getLogger(__name__)


class FilterState(rx.State):
    f_text: str = ""
    f_uploader: str = ANY
    f_from: str = ""
    f_to: str = ""
    f_format: str = ANY
    uploader_options: rx.Field[list[str]] = rx.field(default_factory=list)

    @rx.var
    def filter_count(self) -> int:
        return self._filter_params().count

    def _filter_params(self) -> FilterParams:
        return FilterParams(self.f_text, self.f_uploader, self.f_from, self.f_to, self.f_format)

    def _read_filters(self, params) -> FilterParams:
        filters = FilterParams.from_params(params)
        self.f_text = filters.text
        self.f_uploader = filters.uploader or ANY
        self.f_from = filters.date_from
        self.f_to = filters.date_to
        self.f_format = filters.fmt or ANY
        return filters

    async def _load_uploaders(self) -> None:
        try:
            names = await asyncio.to_thread(webquery.uploaders, get_settings())
        except Exception:  # the menu is a convenience; the page still works without it
            log.exception("could not list uploaders")
            names = []
        if self.f_uploader != ANY and self.f_uploader not in names:
            names = [*names, self.f_uploader]
        self.uploader_options = names

    @rx.event
    def set_f_text(self, value: str):
        self.f_text = value

    @rx.event
    def set_f_uploader(self, value: str):
        self.f_uploader = value

    @rx.event
    def set_f_from(self, value: str):
        self.f_from = value

    @rx.event
    def set_f_to(self, value: str):
        self.f_to = value

    @rx.event
    def set_f_format(self, value: str):
        self.f_format = value

    def _clear_filter_fields(self) -> None:
        self.f_text, self.f_uploader, self.f_from, self.f_to, self.f_format = "", ANY, "", "", ANY
