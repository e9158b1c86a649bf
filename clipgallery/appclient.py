"""The command line's searches answered by a running `clipgallery serve` of the same gallery.

A search in a new process pays for importing torch and open_clip and for loading the model
(≈ 15 s here for one text query) where the running app, its model loaded, answers in
milliseconds (the whole command then takes ≈ 0.5 s). `clipgallery serve` records where it
listens in the state directory (`recorded_app`); `clipgallery search` asks that app through its
JSON API (`search`) when the record is live and names the same database, and searches in its own
process otherwise; `clipgallery status` reports the app's model (`model_health`).

The app answers with what the API would give anyone: a private gallery's app asks for a login,
and the command line then searches in its own process, as it does for anything the API cannot
express (an exact scan) or refuses for a reason other than the query itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from clipgallery.config import Settings
from clipgallery.storage import replace_file_text

log = logging.getLogger(__name__)

RECORD_FILE = "app.json"
# A live app accepts a connection at once; a search may wait for a busy model.
CONNECT_TIMEOUT_SECONDS = 1.0
ANSWER_TIMEOUT_SECONDS = 120.0


def _database_key(settings: Settings) -> str | None:
    """Which database `settings` name: a digest of its URL without the password (so the record
    does not help anyone guess it), or None for the embedded server (its state directory is where
    the record lives)."""
    if settings.database_url is None:
        return None
    parts = urlsplit(settings.database_url)
    if parts.password is not None:
        parts = parts._replace(netloc=f"{parts.username}@{parts.netloc.rpartition('@')[2]}")
    return hashlib.sha256(urlunsplit(parts).encode()).hexdigest()


@contextlib.contextmanager
def recorded_app(settings: Settings, url: str) -> Iterator[None]:
    """While the block runs, the state directory says an app of this gallery answers at `url`
    (the record is removed afterwards, and ignored if its process has died)."""
    record = settings.state_dir / RECORD_FILE
    try:
        replace_file_text(record, json.dumps({"pid": os.getpid(), "url": url, "database": _database_key(settings)}))
    except OSError as exc:  # the app runs all the same; the command line searches in its own process
        log.warning("could not record the app's address in %s: %s", record, exc)
    try:
        yield
    finally:
        # Another app started on this state directory since owns the record now.
        with contextlib.suppress(OSError, ValueError):
            if json.loads(record.read_text()).get("pid") == os.getpid():
                record.unlink()


def running_app_url(settings: Settings) -> str | None:
    """The URL of a running app of the gallery `settings` name, or None."""
    import psutil

    try:
        record = json.loads((settings.state_dir / RECORD_FILE).read_text())
        pid, url, database = int(record["pid"]), str(record["url"]), record.get("database")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if database != _database_key(settings) or not psutil.pid_exists(pid):
        return None
    return url


@dataclass(frozen=True)
class Query:
    """One search as the command line states it: words, an image file, or a stored image's id."""

    words: str | None = None
    image: Path | None = None
    similar: int | None = None
    hybrid: bool | None = None


def search(url: str, query: Query, k: int, offset: int, min_similarity: float | None, metric: str | None):
    """The page the app at `url` answers (a `results.SearchPage`), or None when it cannot answer
    this search (not reachable, needs a login, busy, failing): the caller then searches itself.

    An answer that the query is at fault (invalid, an image id not in the gallery, a file that is
    not an acceptable image) is raised as the error a search in this process would raise."""
    import httpx

    params: dict = {"k": k, "offset": offset}
    if min_similarity is not None:
        params["min_similarity"] = min_similarity
    if metric is not None:
        params["metric"] = metric
    timeout = httpx.Timeout(ANSWER_TIMEOUT_SECONDS, connect=CONNECT_TIMEOUT_SECONDS)
    try:
        with httpx.Client(base_url=url, timeout=timeout, trust_env=False) as client:
            if query.words is not None:
                if query.hybrid is not None:
                    params["hybrid"] = query.hybrid
                response = client.get("/api/search", params={"q": query.words, **params})
            elif query.image is not None:
                files = {"file": (query.image.name, query.image.read_bytes())}
                response = client.post("/api/search/image", params=params, files=files)
            else:
                response = client.get(f"/api/images/{query.similar}/similar", params=params)
    except httpx.HTTPError as exc:
        log.info("the app at %s did not answer (%s): searching here", url, exc)
        return None
    if response.status_code == 200:
        try:
            return _page(response.json())
        except (ValueError, KeyError, TypeError) as exc:  # not this app's API on that port
            log.info("the answer from %s is not a page of results (%s): searching here", url, exc)
            return None
    _raise_query_error(response)
    log.info("the app at %s answered %d: searching here", url, response.status_code)
    return None


def model_health(url: str) -> tuple[bool, str] | None:
    """(ok, detail) of the model as the app at `url` has it loaded, or None if it does not say."""
    import httpx

    try:
        response = httpx.get(f"{url}/api/health", timeout=CONNECT_TIMEOUT_SECONDS * 5, trust_env=False)
        model = response.json()["model"]
        return bool(model["ok"]), str(model["detail"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        log.info("the app at %s did not report its model (%s)", url, exc)
        return None


def _raise_query_error(response) -> None:
    """Raise the error the API reported if it is about the query itself; else return."""
    from clipgallery.gallery import NotFoundError
    from clipgallery.imaging import RejectedImage
    from clipgallery.search import InvalidQuery

    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return
    if code == "invalid_query":
        raise InvalidQuery(message)
    if code == "not_found":
        raise NotFoundError(message)
    if code.startswith("image_"):
        raise RejectedImage(message, kind=code.removeprefix("image_"))


def _page(body: dict):
    from clipgallery.results import SearchHit, SearchPage

    names = [field.name for field in fields(SearchHit)]
    hits = [SearchHit(**{name: hit[name] for name in names if name in hit}) for hit in body["results"]]
    return SearchPage(
        hits=hits,
        metric=body["metric"],
        k=body["k"],
        offset=body["offset"],
        has_more=body["has_more"],
        exact=body["exact"],
        hybrid=body.get("hybrid", False),
    )
