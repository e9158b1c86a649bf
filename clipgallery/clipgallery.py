"""The Reflex app: pages plus the FastAPI routes under /api."""

import reflex as rx

from clipgallery.api import api
from clipgallery.pages import index

app = rx.App(api_transformer=api)
app.add_page(index.index, route="/", title="clipgallery", on_load=index.IndexState.load_status)
