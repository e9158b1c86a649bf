"""Reflex configuration for the clipgallery web app.

The app talks to PostgreSQL through clipgallery's own service layer, so Reflex's database
support (rx.Model, db_url) is not used. Nothing here needs the network at run time; the
first build installs the frontend's npm packages once into .web/node_modules.
"""

import reflex as rx

config = rx.Config(
    app_name="clipgallery",
    telemetry_enabled=False,
    show_built_with_reflex=False,
    plugins=[
        rx.plugins.RadixThemesPlugin(theme=rx.theme(accent_color="iris", gray_color="slate", radius="large")),
    ],
    # A sitemap needs a public deploy URL; a self-hosted gallery has none to advertise.
    disable_plugins=[rx.plugins.SitemapPlugin],
)
